"""The README as a user meets it: every code block runs (or names the test that runs it), and no
file the repository's documents and docstrings point to is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def fenced(text: str = README) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    found, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                found.append((language, "\n".join(body) + "\n"))
                language = None
        elif language is not None:
            body.append(line)
    return found


def blocks(language: str) -> list[str]:
    return [body for lang, body in fenced() if lang == language]


# ---- Python: every block runs as it stands, on a finished study -----------------------------------

# The README speaks of the demo (step 600, layer 2); the tests' finished study is the tiny config run
# as `demo` (tests/conftest.py::demo_repo): the same paths at its last step and layer.
TINY_STEP, TINY_LAYER = "step32", "layer1"

# what the test adds after a block, to see that it did what the README says
AFTER = {
    "@register(": """
import torch
from saedynamics.config import TrainingConfig
from saedynamics.saes import REGISTRY, load
from saedynamics.sources import TensorSource
from saedynamics.training import train_saes

cfg = REGISTRY["l1_example"].Config(architecture="l1_example", l1_coefficient=0.1)
training = TrainingConfig(n_latents=32, seeds=[0, 1], train_tokens=2048, batch_size=256)
train_saes(training, {"mine": cfg}, TensorSource({"act": torch.randn(2048, 8)}), Path("out"),
           {"study": "example"}, {})
sae = load("out/mine/seed0")
assert sae.architecture == "l1_example" and sae.encode(torch.randn(4, 8)).shape == (4, 32)
""",
    "train_saes(": "assert sae.d_sae == 256 and sae.encode(x[:4]).shape == (4, 256)\n",
    "load_from_disk": "assert sae.cfg.d_sae > 0\n",
}


def python_blocks() -> list[str]:
    return blocks("python")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs_on_a_finished_study(demo_repo, tmp_path, index):
    code = python_blocks()[index]
    if "sae_lens" in code:
        pytest.importorskip("sae_lens")
    code = code.replace("step600", TINY_STEP).replace("layer2", TINY_LAYER)
    code += "".join(
        "\nfrom pathlib import Path\n" + after for m, after in AFTER.items() if m in code
    )
    (tmp_path / "results").symlink_to(demo_repo / "results")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"README block {index}:\n{code}\n{done.stderr[-3000:]}"


def test_the_readme_has_the_sections_a_researcher_looks_for():
    headings = re.findall(r"^## (.+)$", README, re.M)
    first = ["What the demo found", "Quick start (offline, CPU)", "Use the results"]
    assert headings[:3] == first, headings
    assert {"Your own model", "Add an architecture"} <= set(headings)
    science = README.index("## What the demo found")
    assert all(README.index(f"## {h}") > science for h in headings if "Pythia on a GPU" in h)


# ---- YAML: a config fragment is valid on top of the study's config --------------------------------


def deep_update(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = deep_update(base[key], value) if both else value
    return out


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_every_yaml_block_is_a_valid_config_change(index):
    from saedynamics.config import load_config

    study = yaml.safe_load((REPO / "config.yaml").read_text())
    change = yaml.safe_load(blocks("yaml")[index])
    load_config(deep_update(study, change))  # raises, naming the key, where it is not


# ---- shell: every command is run by a test, named here ------------------------------------------

# command (a regular expression over the whole line) -> where it is run
RUN_BY = {
    r"pip install torch==2\.13\.0 && pip install -e \. && snakemake --cores all .*": (
        ".ci/run installs; tests/conftest.py::demo_repo runs the workflow (tiny config as demo)"
    ),
    r"pip install -e '\.\[dev\]' && pytest .*": ".ci/run (CI)",
    r"snakemake --workflow-profile workflow/profiles/workstation": "tests/test_containers.py",
    r"snakemake --workflow-profile workflow/profiles/slurm": "tests/test_slurm.py",
    r"dvc repro --pull --allow-missing figures@pythia-70m-deduped": "tests/test_dvc.py",
    r"dvc repro figures@pythia-70m-deduped .*": "tests/conftest.py::demo_repo (dvc repro)",
    r"dvc remote add -d store /shared/dvc/saedynamics .*": "tests/test_dvc.py",
    r"dvc push": "tests/test_dvc.py",
    r"git add dvc\.lock \.dvc/config && git commit .*": "tests/conftest.py::demo_repo",
    # building and publishing the image needs apptainer, root and a registry: not on this machine
    r"apptainer (build|test|registry|push) .*": None,
    r"uv pip compile containers/requirements\.in .*": None,
    r"--python-platform .*": None,  # the continuation of the line above
}


def shell_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_every_shell_command_is_run_by_a_test_or_says_why_not():
    for line in shell_lines():
        matches = [where for pattern, where in RUN_BY.items() if re.fullmatch(pattern, line)]
        assert matches, f"README runs {line!r}: name the test that runs it in RUN_BY"
        for where in filter(None, matches):
            path = where.split("::")[0].split(" ")[0]
            assert (REPO / path).exists(), where


def test_check_config_prints_the_budget_the_readme_shows():
    shown = next(b for b in blocks("") if b.startswith("$ python -m saedynamics check-config"))
    assert "compute" in shown  # the budget table
    command = shown.splitlines()[0].removeprefix("$ ")
    done = subprocess.run(
        command.split(),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    for line in shown.splitlines()[1:]:
        assert line.rstrip() in printed, f"README shows {line!r}; check-config prints {printed}"


# ---- references: every file a document or docstring names exists ---------------------------------

PATH = re.compile(
    r"(?<![\w/.$<{-])((?:docs|src|tests|workflow|benchmarks|containers)/[\w./-]*\w)(?![\w*])"
)
BUILT = (".sif",)  # build outputs, named where the docs say how to build them


def documents() -> list[Path]:
    globs = ("docs/**/*.md", "src/**/*.py", "tests/**/*.py", "tests/**/*.sh", "workflow/**/*")
    found = [REPO / "README.md", REPO / "Snakefile", REPO / "dvc.yaml"]
    found += [p for g in globs for p in REPO.glob(g) if p.is_file()]
    found += [p for p in REPO.glob("benchmarks/*") if p.suffix in (".py", ".md")]
    skip = ("docs/spec/", "tests/test_readme.py")  # a copy of the shared spec; patterns above
    return [p for p in found if not any(s in str(p) for s in skip)]


def test_no_document_names_a_file_that_is_not_in_the_repository():
    missing = []
    for doc in documents():
        text = doc.read_text(errors="replace")
        for ref in PATH.findall(text):
            if not ref.endswith(BUILT) and not (REPO / ref).exists():
                missing.append(f"{doc.relative_to(REPO)}: {ref}")
        for m in re.finditer(r"(?<!docs/)(?<![\w/])spec/[\w-]+\.md", text):
            missing.append(f"{doc.relative_to(REPO)}: {m.group()} (the spec is docs/spec/)")
    assert not missing, "\n".join(missing)
