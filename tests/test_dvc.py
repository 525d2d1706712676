"""DVC over the workflow (dvc.yaml): the stages' deps, params and outs match the workflow, and a fresh
clone rebuilds the figures from cached artifacts without running any upstream job."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, copy_workflow, dvc, git

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())
STUDIES = STAGES["vars"][0]["studies"]
# the files the figures stage alone depends on: editing them must not re-run compute
FIGURE_CODE = {"src/saedynamics/figures.py", "workflow/rules/figures.smk"}
# the explorer stage's own code: a dep of that stage only
EXPLORER_CODE = {"workflow/rules/explorer.smk"} | {
    p.relative_to(REPO).as_posix() for p in (REPO / "src/saedynamics/explorer").rglob("*.py")
}
# `python -m saedynamics snakemake` starts Snakemake on the host; no job runs it
LAUNCHER_CODE = {"src/saedynamics/snakemake_args.py"}
# the rules of the figures and explorer stages; every other rule belongs to compute
FIGURE_RULES = {"figures"}
EXPLORER_RULES = {"explorer"}
UPSTREAM_RULES = {
    "tokens",
    "checkpoint",
    "micro_lm",
    "activations",
    "train",
    "measure",
    "splice",
    "drift",
    "tables",
    "validation",
}


def stage(name: str, study: str = "demo") -> dict:
    """A foreach stage's definition with one study's ${item.*} filled in."""
    text = json.dumps(STAGES["stages"][name]["do"])
    for key, value in STUDIES[study].items():
        text = text.replace("${item." + key + "}", value)
    return json.loads(text)


def param_keys(definition: dict) -> dict[str, list[str] | None]:
    return {k: v for entry in definition["params"] for k, v in entry.items()}


def out_paths(definition: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in definition["outs"]]


# ---- fast: dvc.yaml against the files and the workflow ---------------------------------------------


def test_compute_deps_are_exactly_the_code_compute_runs():
    """Every module and rule file but the figures', the explorer's and the launcher's, so that a new
    module cannot be forgotten and an edit to the figure or explorer code cannot re-run training."""
    deps = stage("compute")["deps"]
    assert len(deps) == len(set(deps)), "a dep is listed twice"
    expected = (
        (
            {"Snakefile", "containers/saedynamics.def", "containers/requirements.lock"}
            | {p.relative_to(REPO).as_posix() for p in (REPO / "src/saedynamics").rglob("*.py")}
            | {p.relative_to(REPO).as_posix() for p in (REPO / "workflow/rules").glob("*.smk")}
        )
        - FIGURE_CODE
        - EXPLORER_CODE
        - LAUNCHER_CODE
    )
    missing, extra = sorted(expected - set(deps)), sorted(set(deps) - expected)
    assert not missing, f"dvc.yaml: compute deps lack {missing} (list every file compute runs)"
    assert not extra, f"dvc.yaml: compute deps list {extra}, which are gone or figure code"


@pytest.mark.parametrize(
    "name, inputs, code",
    [
        ("figures", ["tables"], FIGURE_CODE),
        ("explorer", ["saes", "activations", "checkpoints", "tables"], EXPLORER_CODE),
    ],
)
def test_a_drawing_stage_depends_on_its_inputs_and_all_code(name, inputs, code):
    deps = stage(name)["deps"]
    assert {f"results/demo/{i}" for i in inputs} <= set(deps)
    for path in code:
        assert any(path == d or path.startswith(d + "/") for d in deps), path
    assert (REPO / ".dvcignore").read_text().count("__pycache__/") == 1  # folder deps stay stable


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_params_are_the_study_config_but_figures(study):
    """compute tracks every top-level key of the study's config but `figures` and `explorer` (DVC
    fails on a listed key that the file lacks); figures and explorer track the whole file."""
    config = STUDIES[study]["config"]
    keys = set(yaml.safe_load((REPO / config).read_text()))
    assert set(param_keys(stage("compute", study))[config]) == keys - {"figures", "explorer"}
    assert param_keys(stage("figures", study)) == {config: None}
    assert param_keys(stage("explorer", study)) == {config: None}


def test_outs_cover_every_workflow_output(tmp_path):
    """Every file of the demo's DAG (but logs and benchmarks) lies in exactly one out: the figure
    rule's in the figures stage's outs, the explorer rule's in the explorer stage's, everything
    upstream in compute's."""
    wd = copy_workflow(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--summary", "--cores", "1"],
        cwd=wd,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [line.split("\t") for line in out.stdout.splitlines()[1:] if "\t" in line]
    rules = UPSTREAM_RULES - {"checkpoint"} | FIGURE_RULES | EXPLORER_RULES
    assert {rule for _, _, rule, *_ in rows} == rules
    outs = {name: out_paths(stage(name)) for name in ("compute", "figures", "explorer")}
    assert all(o.startswith(STUDIES["demo"]["results"] + "/") for o in sum(outs.values(), []))
    for path, _, rule, *_ in rows:
        if re.match(r"results/demo/(logs|benchmarks)/", path):
            continue
        owners = [
            (name, o)
            for name, paths in outs.items()
            for o in paths
            if f"{path}/".startswith(o + "/")
        ]
        assert len(owners) == 1, f"{path} ({rule}) lies in {owners or 'no out'}"
        expected = (
            "figures"
            if rule in FIGURE_RULES
            else "explorer"
            if rule in EXPLORER_RULES
            else "compute"
        )
        assert owners[0][0] == expected, (path, owners)
    assert all(o.get(next(iter(o)), {}).get("persist") for o in stage("compute")["outs"])


def test_stage_commands_target_the_right_rules():
    compute = stage("compute")["cmd"].split()
    assert compute[:3] == ["snakemake", "tables", "validation"]
    for name in ("figures", "explorer"):
        cmd = stage(name)["cmd"].split()
        assert cmd[:2] == ["snakemake", name]
        assert cmd[cmd.index("--allowed-rules") + 1 :] == [name]


def test_plots_are_outputs_of_the_stages():
    from saedynamics.figures import FIGURES, VALIDATION_FIGURES

    plotted = []
    for entry in STAGES["plots"]:
        if isinstance(entry, str):
            plotted.append(entry)
        else:
            ((_, spec),) = entry.items()
            plotted += list(spec["y"])
    assert {p.split("/")[1] for p in plotted} == set(STUDIES)
    names = {f"{n}.png" for n in FIGURES} | {f"{n}.png" for n in VALIDATION_FIGURES}
    names |= {"superposition.json"}
    for path in plotted:
        study = path.split("/")[1]
        outs = out_paths(stage("compute", study)) + out_paths(stage("figures", study))
        assert any(path.startswith(o + "/") for o in outs), path
        assert path.rsplit("/", 1)[1] in names, path


def test_readme_command_names_a_figures_stage():
    stage_name = readme_command()[-1].replace("@demo", "")
    section = (REPO / "README.md").read_text().split("### Figures from cached artifacts\n")[1]
    study = re.search(r"dvc repro --pull --allow-missing figures@([\w.-]+)", section).group(1)
    assert stage_name == "figures" and study in STUDIES


# ---- slow: push, clone, rebuild the figures from the cache ------------------------------------------


def readme_command() -> list[str]:
    """The copy-paste command of README's "Figures from cached artifacts", for the demo."""
    section = (REPO / "README.md").read_text().split("### Figures from cached artifacts\n")[1]
    section = re.split(r"\n##+ ", section)[0]
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for line in block.splitlines()
    ]
    repro = [line for line in lines if line.startswith("dvc repro --pull")]
    assert len(repro) == 1, lines
    assert re.fullmatch(r"dvc repro --pull --allow-missing figures@[\w.-]+", repro[0]), repro
    return shlex.split(re.sub(r"figures@[\w.-]+", "figures@demo", repro[0]))


def snakemake_jobs(repo: Path) -> list[str]:
    """The rules of every job that Snakemake started in `repo`, from its logs."""
    logs = sorted((repo / ".snakemake/log").glob("*.snakemake.log"))
    assert logs, "Snakemake did not run"
    return [
        m.group(1)
        for log in logs
        for m in re.finditer(r"^(?:local)?rule (\w+):$", log.read_text(), re.M)
    ]


@pytest.mark.slow
def test_figures_from_cached_artifacts(demo_repo, tmp_path):
    """Push the demo, clone it, change a figure's style, run README's command: only the tables
    are pulled, only the figure rule runs, and the figures change."""
    # the remote, as README sets it up
    store = tmp_path / "dvc-store"
    dvc(demo_repo, "remote", "add", "-d", "store", str(store))
    git(demo_repo, "commit", "--quiet", "-m", "DVC remote", ".dvc/config")
    dvc(demo_repo, "push")
    demo_stages = ("compute@demo", "figures@demo")
    assert json.loads(dvc(demo_repo, "status", "--json", *demo_stages).stdout) == {}
    assert json.loads(dvc(demo_repo, "status", "--cloud", "--json", *demo_stages).stdout) == {}

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(demo_repo), str(clone))
    assert not (clone / "results").exists() and not (clone / ".snakemake").exists()
    figures_py = clone / "src/saedynamics/figures.py"
    figures_py.write_text(
        figures_py.read_text()
        + "\n\n_house_style = _style\n\n\ndef _style() -> None:  # thicker lines\n"
        "    _house_style()\n    plt.rcParams['lines.linewidth'] = 3.5\n"
    )
    lock_before = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]

    out = dvc(clone, *readme_command()[1:])
    log = out.stdout + out.stderr
    assert "Stage 'compute@demo' didn't change, skipping" in log, log
    assert "Running stage 'figures@demo'" in log, log

    # (a) the figure rule alone ran
    jobs = snakemake_jobs(clone)
    assert jobs and set(jobs) <= FIGURE_RULES, jobs
    assert not UPSTREAM_RULES & set(jobs)
    # (b) only the tables and the validation summaries were pulled
    results = clone / "results/demo"
    pulled = {"tables", "validation", "figures", "logs", "benchmarks"}
    assert {p.name for p in results.iterdir()} <= pulled
    for name in ("saes", "activations", "checkpoints", "metrics"):
        assert not (results / name).exists(), name
    original = demo_repo / "results/demo"
    assert sorted(os.listdir(results / "tables")) == sorted(os.listdir(original / "tables"))
    # (c) every figure is there, and the thicker lines changed them
    names = sorted(os.listdir(original / "figures"))
    assert names and sorted(os.listdir(results / "figures")) == names
    changed = [
        n
        for n in names
        if (results / "figures" / n).read_bytes() != (original / "figures" / n).read_bytes()
    ]
    assert {"pw_mcc.png", "toy_superposition.png"} <= set(changed), changed
    # (d) compute@demo is unchanged: the same lock entry, no changed dep or param (its outs are
    # merely not pulled), and the figures stage is up to date
    lock_after = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert lock_after["compute@demo"] == lock_before["compute@demo"]
    assert lock_after["figures@demo"] != lock_before["figures@demo"]
    status = json.loads(dvc(clone, "status", "--json", "compute@demo").stdout or "{}")
    changes = [k for entry in status.get("compute@demo", []) for k in entry]
    assert set(changes) <= {"changed outs"}, status
    outs = {
        p: s for entry in status.get("compute@demo", []) for p, s in entry["changed outs"].items()
    }
    assert "results/demo/tables" not in outs and set(outs.values()) <= {"not in cache"}, status
    assert json.loads(dvc(clone, "status", "--json", "figures@demo").stdout or "{}") == {}
    dry = dvc(clone, "repro", "--allow-missing", "--dry", "figures@demo").stdout
    assert "Stage 'figures@demo' didn't change, skipping" in dry, dry
