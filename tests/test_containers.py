"""The Apptainer runtime: the definition file, its lock, and how Snakemake runs rules in it.

Apptainer cannot be installed on the build machine, so the wiring is tested with a stand-in
`apptainer` (tests/apptainer/apptainer) that records what Snakemake asks of it and runs the
command on the host as the container would (HOME = --home, APPTAINER_CONTAINER = the image).
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest

from .conftest import REPO, copy_workflow
from .test_dvc import EXPLORER_RULES, FIGURE_RULES, UPSTREAM_RULES
from .test_workflow import run

DEF = REPO / "containers/saedynamics.def"
STANDIN = REPO / "tests/apptainer"
IMAGE = "containers/saedynamics-0.1.0.sif"  # containers.main's default
GPU_RULES = {"activations", "train", "splice", "explorer"}  # resources: gpu=1


def test_definition_parses_and_pins_its_base_image_by_digest():
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(DEF)).recipe["spython-base"]
    assert re.fullmatch(r"[\w./-]+@sha256:[0-9a-f]{64}", recipe.fromHeader), recipe.fromHeader
    assert "containers/requirements.lock /opt/saedynamics/requirements.lock" in recipe.files
    assert any("--require-hashes" in line for line in recipe.install)
    assert any("PYTHONNOUSERSITE=1" in line for line in recipe.environ)
    assert any(label.startswith("org.opencontainers.image.version ") for label in recipe.labels)
    # spython folds %test into the build script; the sections themselves are checked here
    text = DEF.read_text()
    assert text.startswith("Bootstrap: docker\n")
    sections = re.findall(r"^%(\w+)", text, flags=re.M)
    assert sections == ["files", "post", "environment", "labels", "test"]
    test_section = text.split("%test", 1)[1]
    assert "import saedynamics" in test_section and "torch.cuda.is_available()" in test_section


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line.strip()):
            names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return names


def test_lock_is_hashed_and_covers_every_import_of_the_package():
    lock = (REPO / "containers/requirements.lock").read_text()
    pinned = re.findall(
        r"^([A-Za-z0-9][\w.-]*)==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+)", lock, re.M
    )
    assert len(pinned) == len(re.findall(r"^[A-Za-z0-9][\w.-]*==", lock, re.M)) > 20
    locked = {re.sub(r"[-_.]+", "-", name).lower() for name, _ in pinned}
    requested = _requirement_names(REPO / "containers/requirements.in")
    assert requested <= locked, requested - locked
    # every third-party module the package imports is in the image (torch comes from the base
    # image; sae_lens only for the optional SAELens export check), but for the launcher's:
    # `python -m saedynamics snakemake` starts the workflow on the host, never in a job
    module_to_dist = {"yaml": "pyyaml", "PIL": "pillow"}
    optional = {"torch", "sae_lens"}
    imported = set()
    for source in (REPO / "src/saedynamics").rglob("*.py"):
        if source.name == "snakemake_args.py":
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names} - {"saedynamics"}
    needed = {module_to_dist.get(m, m).replace("_", "-") for m in third_party - optional}
    assert needed <= locked, needed - locked


def _standin_env(tmp_path: Path) -> tuple[dict, Path]:
    log = tmp_path / "apptainer-calls.jsonl"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.pathsep.join(
            [str(STANDIN), str(Path(sys.executable).parent), os.environ["PATH"]]
        ),
        "APPTAINER_STANDIN_LOG": str(log),
        "HOME": str(home),  # the declared caches land here, not in the real home
        "SAEDYNAMICS_GIT_COMMIT": "0123abc",  # the copy is no git checkout
    }
    for var in ("APPTAINER_NV", "APPTAINER_BIND", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        env[var] = None  # unset: the workflow must set them itself
    return env, log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _rule(call: dict) -> str:
    return call["command"][-1].split("python -m saedynamics ", 1)[1].split()[0].replace("-", "_")


def _assert_container_wiring(calls: list[dict], wd: Path, home: Path) -> None:
    caches = {
        "HF_HOME": home / ".cache/huggingface",
        "MPLCONFIGDIR": home / ".cache/saedynamics/matplotlib",
        "TRITON_CACHE_DIR": home / ".cache/saedynamics/triton",
    }
    for call in calls:
        assert call["image"] == IMAGE and call["returncode"] == 0
        assert call["nv"], f"{_rule(call)}: no --nv / APPTAINER_NV=true"
        assert call["home"] == str(wd) and call["cwd"] == str(wd)
        assert call["command"][:2] == ["bash", "-c"]
        assert "PYTHONPATH=src python -m saedynamics" in call["command"][2]
        for var, path in caches.items():
            assert call["env"][var] == str(path), var
            assert str(path) in call["binds"], (var, call["binds"])
        assert call["env"]["SAEDYNAMICS_GIT_COMMIT"]
    # nothing was cached into the checkout, and the declared caches were used
    for name in (".cache", ".config", ".triton", ".local"):
        assert not (wd / name).exists(), f"{name} appeared in the checkout"


def _fake_checkout(tmp_path: Path) -> Path:
    wd = copy_workflow(tmp_path / "wd")
    (wd / IMAGE).parent.mkdir(parents=True, exist_ok=True)
    (wd / IMAGE).write_bytes(b"")  # the stand-in only checks that the image exists
    return wd


def test_bare_use_apptainer_gets_the_gpu_binds_and_caches_without_flags(tmp_path):
    """README: `snakemake --cores all --use-apptainer`: no --apptainer-args, yet --nv and the
    cache binds reach apptainer."""
    wd = _fake_checkout(tmp_path)
    env, log = _standin_env(tmp_path)
    run(
        [
            "results/tiny/tokens",
            "--cores",
            "all",
            "--use-apptainer",
            "--configfile",
            "workflow/configs/tiny.yaml",
        ],
        cwd=wd,
        env=env,
    )
    calls = _calls(log)
    assert [_rule(c) for c in calls] == ["tokens"]
    assert "--nv" not in calls[0]["argv"] and calls[0]["env"]["APPTAINER_NV"] == "true"
    _assert_container_wiring(calls, wd, tmp_path / "home")


@pytest.mark.slow
def test_workstation_profile_runs_every_rule_in_the_container_one_gpu_job_at_a_time(tmp_path):
    """README: `snakemake --workflow-profile workflow/profiles/workstation` (tiny study)."""
    from .provenance_check import assert_every_artifact_has_provenance

    wd = _fake_checkout(tmp_path)
    env, log = _standin_env(tmp_path)
    run(
        [
            "--workflow-profile",
            "workflow/profiles/workstation",
            "--configfile",
            "workflow/configs/tiny.yaml",
        ],
        cwd=wd,
        env=env,
    )
    calls = _calls(log)
    rules = {_rule(c) for c in calls}
    assert rules == UPSTREAM_RULES - {"checkpoint"} | FIGURE_RULES | EXPLORER_RULES  # no download
    assert all("--nv" in c["argv"] for c in calls)  # the profile's apptainer-args
    _assert_container_wiring(calls, wd, tmp_path / "home")
    # matplotlib wrote its cache where it was told
    assert any((tmp_path / "home/.cache/saedynamics/matplotlib").iterdir())
    # the GPU rules never overlapped (resources: gpu: 1), though the machine runs 2 jobs at once
    gpu = sorted((c["start"], c["end"], _rule(c)) for c in calls if _rule(c) in GPU_RULES)
    assert (
        len(gpu) == 2 + 4 + 4 + 1
    )  # activations per step, train and splice per (step, layer), explorer
    for (_, end, a), (start, _, b) in zip(gpu, gpu[1:], strict=False):
        assert start >= end, f"{a} and {b} ran at the same time"
    # every artifact records the image, the commit and its settings (tests/provenance_check.py)
    root = wd / "results/tiny"
    checked = assert_every_artifact_has_provenance(root, container=IMAGE, git_commit="0123abc")
    assert {".json", ".parquet", ".safetensors", ".png"} <= {p.suffix for p in checked}
    assert root / "tokenizer" in checked and root / "checkpoints/step32" in checked
