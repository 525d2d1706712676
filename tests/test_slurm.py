"""The demo on a real single-node SLURM cluster, through snakemake-executor-plugin-slurm.

The cluster is Debian's slurmctld + slurmd + munge, started by tests/slurm/start-local-slurm.sh
(root only) and stopped by pid afterwards. The workflow runs with the project's own profile,
`snakemake --workflow-profile workflow/profiles/slurm` (the README's command), with two additions
that this cluster needs: the demo's config instead of the Pythia study, and `squeue` for job status
(the test cluster has no accounting database). Rules run in the stand-in `apptainer`
(tests/apptainer), which records every job's environment: that is how the test sees which jobs
came through sbatch, on which partition, with a GPU or not.

The study is the one the `demo_repo` fixture runs as the demo (the tiny config: SLURM's wiring is
what is tested, not the demo's size), and the local run it is compared with is that fixture's
clean run through DVC: every table and every SAE's weights must be bitwise equal, which is the
test of CPU reproducibility from the config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from saedynamics.tables import TABLES

from .conftest import use_test_demo_config
from .test_containers import GPU_RULES, IMAGE, _calls, _fake_checkout, _rule, _standin_env
from .test_workflow import run

SCRIPTS = Path(__file__).parent / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
LOCAL_RULES = {"tokens", "checkpoint", "tables", "figures"}  # `localrule: True` in their .smk


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    missing = [exe for exe in DAEMONS if shutil.which(exe) is None]
    reason = (
        f"needs {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
        if missing
        else "needs root to start the SLURM daemons"
        if os.geteuid() != 0
        else None
    )
    if reason:
        if os.environ.get("CI"):  # CI installs the packages: there it must run
            pytest.fail(reason)
        pytest.skip(reason)
    pidfile = tmp_path_factory.mktemp("slurm") / "daemons.pid"
    start = subprocess.run(
        [SCRIPTS / "start-local-slurm.sh", pidfile], capture_output=True, text=True, timeout=300
    )
    pids = [(line.split()[0], int(line.split()[1])) for line in pidfile.read_text().splitlines()]
    try:
        assert start.returncode == 0, f"SLURM did not start:\n{start.stdout}\n{start.stderr}"
        assert [name for name, _ in pids] == ["munged", "slurmctld", "slurmd"]
        yield
    finally:
        subprocess.run([SCRIPTS / "stop-local-slurm.sh", pidfile], timeout=120)
        left = [f"{name} ({pid})" for name, pid in pids if _alive(pid)]
        left += subprocess.run(
            ["pgrep", "-a", "-x", "munged|slurmctld|slurmd|slurmscriptd"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        assert not left, f"daemons still running: {left}"
        # a config left behind makes every later Snakemake start wait on `scontrol` (9 s)
        assert not Path("/etc/slurm/slurm.conf").exists()


def run_on_slurm(wd: Path, env: dict, config: str) -> subprocess.CompletedProcess:
    return run(
        [
            "--workflow-profile",
            "workflow/profiles/slurm",
            "--configfile",
            config,
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "2",
            "--seconds-between-status-checks",  # a tiny study's jobs take seconds (default 10)
            "2",
        ],
        cwd=wd,
        env=env,
    )


def artifact_files(root: Path) -> set[str]:
    skip = ("logs", "benchmarks")
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in skip and not p.name.startswith(".")
    }


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_through_slurm_equals_the_local_run(local_slurm, demo_repo, tmp_path):
    from .provenance_check import assert_every_artifact_has_provenance

    wd = _fake_checkout(tmp_path)
    use_test_demo_config(wd)  # the study demo_repo ran
    env, log = _standin_env(tmp_path)
    out = run_on_slurm(wd, env, "workflow/configs/demo.yaml")

    calls = _calls(log)
    submitted = (out.stdout + out.stderr).count("has been submitted with SLURM jobid")
    remote = [c for c in calls if _rule(c) not in LOCAL_RULES]
    local = [c for c in calls if _rule(c) in LOCAL_RULES]
    # every job but the local rules went through sbatch, each as its own SLURM job
    assert remote and local and submitted == len(remote)
    assert len({c["env"].get("SLURM_JOB_ID") for c in remote}) == len(remote)
    assert all("SLURM_JOB_ID" not in c["env"] for c in local)
    for call in remote:
        partition = "gpu" if _rule(call) in GPU_RULES else "cpu"
        assert call["env"]["SLURM_JOB_PARTITION"] == partition, _rule(call)
        # SLURM allocated one of the test cluster's (fake) GPUs to exactly the GPU rules
        assert ("CUDA_VISIBLE_DEVICES" in call["env"]) == (partition == "gpu"), _rule(call)
        assert call["image"] == IMAGE and call["nv"]

    # the same artifacts as the local run, and the same numbers in every table
    slurm_root, local_root = wd / "results/demo", demo_repo / "results/demo"
    assert artifact_files(slurm_root) == artifact_files(local_root)
    for table in TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(slurm_root / f"tables/{table}.parquet"),
            pd.read_parquet(local_root / f"tables/{table}.parquet"),
            check_exact=True,
            obj=f"tables/{table}.parquet",
        )
    # two clean runs of the demo (issue 7): the same SAEs too, tensor for tensor, bit for bit
    weights = sorted(slurm_root.glob("saes/**/sae_weights.safetensors"))
    assert len(weights) == len(list(local_root.glob("saes/**/sae_weights.safetensors"))) > 0
    for path in weights:
        ours, theirs = load_file(path), load_file(local_root / path.relative_to(slurm_root))
        assert ours.keys() == theirs.keys(), path
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), path
    assert_every_artifact_has_provenance(slurm_root, container=IMAGE)
