"""The Snakemake workflow as a user runs it: lint, format, tiny end-to-end runs, bad config."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from saedynamics.figures import FIGURES, VALIDATION_FIGURES

from .conftest import REPO, copy_workflow, hub_config
from .provenance_check import assert_every_artifact_has_provenance

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run(args, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    """Run Snakemake in `cwd`; `env` adds to the environment (a value of None removes the variable)."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    out = subprocess.run(SNAKEMAKE + args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        )
    return out


def test_lint_is_clean():
    out = run(["--lint", "--cores", "1"], cwd=REPO)
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_snakefmt_is_clean():
    exe = shutil.which("snakefmt") or str(Path(sys.executable).parent / "snakefmt")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [exe, "--check", "Snakefile", "workflow/rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr


def test_demo_dag_plans_every_stage():
    out = run(["-n", "--forceall", "--cores", "2", "--quiet", "rules"], cwd=REPO)
    for rule in ("tokens", "micro_lm", "activations", "train", "measure", "tables", "figures"):
        assert rule in out.stdout, rule


@pytest.mark.slow
def test_a_study_end_to_end(demo_repo):
    """The shared end-to-end run (conftest.demo_repo: the tiny config as `demo`, through DVC, which
    runs Snakemake): every stage's outputs, one job per (step, layer) for training and measuring,
    provenance, memory, a second run that does nothing, and the report."""
    raw = yaml.safe_load((demo_repo / "workflow/configs/demo.yaml").read_text())
    steps, layers = raw["model"]["steps"], raw["activations"]["layers"]
    n_arch, n_seeds = len(raw["architectures"]), len(raw["training"]["seeds"])
    root = demo_repo / "results/demo"
    figures = sorted(p.name for p in (root / "figures").iterdir())
    formats = raw.get("figures", {}).get("formats", ["png", "pdf"])
    assert len(figures) == len(formats) * (len(FIGURES) + len(VALIDATION_FIGURES))
    assert all((root / "figures" / f).stat().st_size > 5000 for f in figures)
    recon = pd.read_parquet(root / "tables/reconstruction.parquet")
    assert len(recon) == len(steps) * len(layers) * n_arch * n_seeds
    assert recon["fvu"].between(0, 1.5).all() and (recon["l0"] > 0).all()
    cons = pd.read_parquet(root / "tables/consistency.parquet")
    pairs = n_seeds * (n_seeds - 1) // 2
    assert len(cons) == len(steps) * len(layers) * n_arch * pairs
    assert (cons["mcc"] > cons["null_pw_mcc"]).all()
    assert set(pd.read_parquet(root / "tables/checkpoints.parquet")["step"]) == set(steps)
    # one train and one measure job per (step, layer), each writing every architecture's files
    per_layer = {f"step{s}/layer{layer}.tsv" for s in steps for layer in layers}
    for rule in ("train", "measure"):
        found = {
            str(p.relative_to(root / "benchmarks" / rule))
            for p in (root / "benchmarks" / rule).rglob("*.tsv")
        }
        assert found == per_layer, rule
    cfg = json.loads(next(root.glob("saes/step*/layer*/*/seed0/cfg.json")).read_text())
    assert cfg["saedynamics"]["trained_with"] == sorted(raw["architectures"])
    # the tiny config streams its training activations: no train split is cached anywhere
    assert raw["training"]["source"] == "stream"
    assert sorted(p.name for p in root.glob("activations/step*/layer*/*")) == ["eval.parquet"] * (
        len(steps) * len(layers)
    )
    assert cfg["saedynamics"]["activations"]["model"] == "micro"
    # outside a container every artifact still records settings, version and commit
    assert_every_artifact_has_provenance(root, container=None)
    # every job stays far below 4 GB (benchmark files record max RSS in MB)
    rss = [
        pd.read_csv(f, sep="\t")["max_rss"].iloc[0] for f in (root / "benchmarks").rglob("*.tsv")
    ]
    assert len(rss) == 5 + len(steps) + 3 * len(per_layer) + 1 + 1 and max(rss) < 4000  # explorer
    # a second run has nothing to do
    again = run(["-n", "--cores", "2", "--configfile", "workflow/configs/demo.yaml"], cwd=demo_repo)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the report is self-contained: every figure embedded, with its caption
    report = demo_repo.parent / "report.html"
    run(["--configfile", "workflow/configs/demo.yaml", "--report", str(report)], cwd=demo_repo)
    html = report.read_text()
    flagged = sorted((root / "figures").iterdir())
    assert flagged
    for path in flagged:
        assert base64.b64encode(path.read_bytes()).decode() in html, path.name
        caption = (REPO / "workflow/report" / f"{path.stem}.rst").read_text()
        assert caption.split("**")[1] in html, path.name
    # and the explorer's first page, with its caption
    explorer = (REPO / "workflow/report/explorer.rst").read_text()
    assert explorer.split("**")[1] in html and "explorer.html" in html


@pytest.mark.slow
def test_hub_study_runs_offline(tmp_path, hub_cache):
    """The Hub source through the workflow, against the local cache (real download code)."""
    wd = copy_workflow(tmp_path / "wd")
    raw = hub_config(tmp_path, hub_cache)
    raw["activations"]["layers"] = [1]
    (wd / "hub.yaml").write_text(yaml.safe_dump(raw))
    run(["--cores", "2", "--configfile", "hub.yaml"], cwd=wd, env={"HF_HUB_CACHE": str(hub_cache)})
    root = Path(raw["results"]) / "hub-test"
    checkpoints = pd.read_parquet(root / "tables/checkpoints.parquet").set_index("step")
    assert checkpoints.loc[1, "duplicate_of"] == 0 and pd.isna(checkpoints.loc[2, "duplicate_of"])
    assert checkpoints["lm_eval_loss"].notna().all()
    assert (root / "figures/pw_mcc.png").exists()
    # the demo's micro suite was not merged into this study
    assert (
        not (wd / "results/demo").exists() and not (root / "checkpoints/micro_lm.parquet").exists()
    )


def test_bad_config_stops_before_any_job(tmp_path):
    wd = copy_workflow(tmp_path)
    bad = yaml.safe_load((REPO / "workflow/configs/tiny.yaml").read_text())
    bad["architectures"]["topk"]["architecture"] = "top_k"
    (wd / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = run(["--cores", "1", "--configfile", "bad.yaml"], cwd=wd, check=False)
    assert out.returncode != 0
    assert "architectures.topk.architecture: 'top_k' is not registered; allowed:" in out.stderr
    assert not (wd / "results").exists()


def test_config_overrides_reach_the_jobs_as_numbers():
    """`--config 'training={n_latents: 32}'`: Snakemake passes '32', the jobs get the number."""
    out = run(
        ["-n", "-p", "--forceall", "--cores", "1", "--config", "training={n_latents: 32}"],
        cwd=REPO,
    )
    assert '"n_latents": 32,' in out.stdout and '"n_latents": 512' not in out.stdout


def test_a_configfile_replaces_the_demo_config():
    """A --configfile is the whole config: the demo's architectures are not merged into the tiny
    config's, and Snakemake does not report an extended demo config."""
    out = run(
        ["-n", "-p", "--forceall", "--cores", "1", "--configfile", "workflow/configs/tiny.yaml"],
        cwd=REPO,
    )
    assert '"study": "tiny"' in out.stdout and '"batchtopk"' not in out.stdout
    assert "is extended by" not in out.stdout + out.stderr


def test_a_missing_configfile_is_named(tmp_path):
    """Snakemake reads --configfile before the Snakefile (so before any code of ours): its
    traceback's last line names the file; nothing is created. (`python -m saedynamics snakemake`
    names it in one line: tests/test_bad_input.py.)"""
    wd = copy_workflow(tmp_path / "wd")
    out = run(["-n", "--cores", "1", "--configfile", "missing.yaml"], cwd=wd, check=False)
    assert out.returncode != 0
    last = (out.stdout + out.stderr).strip().splitlines()[-1]
    assert last == "FileNotFoundError: [Errno 2] No such file or directory: 'missing.yaml'"
    assert not (wd / "results").exists()


def test_running_from_another_directory(tmp_path):
    """`snakemake -s <checkout>/Snakefile` from elsewhere stops at once naming the fix; with
    `--directory <checkout>` it works."""
    wd = copy_workflow(tmp_path / "wd")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(["-n", "--cores", "1", "-s", str(wd / "Snakefile")], cwd=elsewhere, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback (most recent call last)" not in text, text
    assert (
        f"the working directory {elsewhere} is not the checkout of this Snakefile ({wd}): run "
        f"from the repository root, or use --directory {wd}"
    ) in text
    assert not (elsewhere / "results").exists() and not (elsewhere / "workflow").exists()
    args = ["-n", "--cores", "1", "-s", str(wd / "Snakefile"), "--directory", str(wd)]
    assert "tokens" in run([*args, "--quiet", "rules"], cwd=elsewhere).stdout
