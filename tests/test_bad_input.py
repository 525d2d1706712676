"""Bad input (issue 7, item 5): malformed configs and hostile values stop before any compute, with
one short message naming the key (or the file), and leave nothing behind.

CASES lists every malformed config as one small change to workflow/configs/tiny.yaml (set or
delete dotted keys, or replace the whole file's text), by category. Each case is checked three
ways: `load_config` raises ConfigError whose message names the key and is one short paragraph;
the CLI (`check-config`, and a stage given `--config`) exits 1 printing that message and no
traceback; and the real entry points, `snakemake --configfile` and `python -m saedynamics`, do
the same in a copy of the workflow without creating a file (one case per category here; every
case in the slow test). `test_every_category_has_cases` prints how many cases each category has
and requires at least three. Malformed *files* (checkpoints, activation files, SAEs) are
tests/test_integrity.py's; a Hub checkpoint that would need remote code is tested here.

Paths: what the user may choose and what is refused.
- `results` is the user's own choice of folder: absolute, relative, `..`, outside the checkout
  are all fine (it is their disk; the Hub tests write to a tmp folder). Refused is only what would
  put results somewhere else than the folder named: '' (the root would become `/<study>`), a
  leading `~` (not expanded: a folder named `~` would appear in the working directory), braces
  (Snakemake reads them as wildcards) and whitespace or shell metacharacters (the rules pass paths
  to shell commands unquoted).
- `study` and architecture names become folders inside `<results>/`: lower-case slugs only, so
  `../x`, `a/b`, `/abs`, `.`, '' are refused: nothing can escape `<results>/<study>/`.
- `model.repo_id`, `model.revision` and `model.tokenizer_revision` name folders and files of the
  Hugging Face cache: `..` and a leading `/` are refused (as the Hub refuses them).
- `model.cache_dir`, `corpus.data_files` and `containers.main` are paths the user chooses to read
  from; they are only read, never written, and are not restricted.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from snakemake.cli import parse_config as snakemake_parse_config

from saedynamics.artifacts import read_json, sha256_file, write_json
from saedynamics.checkpoints import download_checkpoint, download_tokenizer, load_model
from saedynamics.cli import main
from saedynamics.config import HubModelConfig, coerce_overrides, load_config
from saedynamics.errors import ConfigError, DataError
from saedynamics.snakemake_args import check_arguments, dotted_entry

from .conftest import REPO, copy_workflow, hub_config, snapshot_of

TINY = yaml.safe_load((REPO / "workflow/configs/tiny.yaml").read_text())
DELETE = object()  # a change that removes the key
FILE = "<file>"  # in `names`: the config file's path
PYTHIA_70M = {"source": "hub", "repo_id": "EleutherAI/pythia-70m-deduped", "steps": [0, 1000]}
OTHER_HUB = {
    "source": "hub",
    "repo_id": "someone/model",
    "steps": [0, 1],
    "num_layers": 4,
    "d_model": 16,
}
NEVER = "saedynamics never runs code from a model or dataset repository"


@dataclass(frozen=True)
class Case:
    category: str
    id: str
    change: dict | str | bytes  # dotted key -> value (DELETE: removed), in order; or the file
    names: str  # what the message must name: a dotted key, or FILE
    says: str = ""  # and what else it must say

    def raw_text(self) -> str | bytes:
        if isinstance(self.change, str | bytes):
            return self.change
        raw = copy.deepcopy(TINY)
        for key, value in self.change.items():
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})  # a section tiny.yaml leaves out
            if value is DELETE:
                del node[last]
            else:
                node[last] = value
        return yaml.safe_dump(raw, sort_keys=False)


C = Case
CASES = [
    # ---- wrong types ------------------------------------------------------------------------
    C("wrong type", "str-for-int", {"training.n_latents": "many"}, "training.n_latents"),
    C("wrong type", "bool-for-int", {"training.n_latents": True}, "training.n_latents", "True"),
    C("wrong type", "quoted-int", {"tokens.context_length": "32"}, "tokens.context_length"),
    C("wrong type", "float-for-int", {"figures.dpi": 200.5}, "figures.dpi"),
    C("wrong type", "str-for-list", {"training.seeds": "0,1"}, "training.seeds"),
    C("wrong type", "bools-in-list", {"training.seeds": [True, False]}, "training.seeds.0"),
    C("wrong type", "list-for-dict", {"training": [64, 16384]}, "training"),
    C("wrong type", "str-for-model", {"model": "micro"}, "model"),
    C(
        "wrong type",
        "str-for-bool",
        {"activations.drop_first_position": "yes"},
        "drop_first_position",
    ),
    C("wrong type", "int-for-str", {"study": 7}, "study"),
    C("wrong type", "scalar-betas", {"training.adam_betas": 0.9}, "training.adam_betas"),
    C("wrong type", "arch-bool-k", {"architectures.topk.k": True}, "architectures.topk.k"),
    C("wrong type", "arch-str-lr", {"architectures.relu.lr": "fast"}, "architectures.relu.lr"),
    # ---- unknown keys -----------------------------------------------------------------------
    C(
        "unknown key",
        "top-level-typo",
        {"trainig": TINY["training"], "training": DELETE},
        "trainig",
        "unknown key; allowed keys here: ",
    ),
    C(
        "unknown key",
        "n_latent",
        {"training.n_latent": 64, "training.n_latents": DELETE},
        "training.n_latent: unknown key",
        "n_latents",
    ),
    C("unknown key", "top-level-extra", {"seeds": [0, 1]}, "seeds: unknown key"),
    C("unknown key", "activations.layer", {"activations.layer": 0}, "activations.layer: unknown"),
    C("unknown key", "model-typo", {"model.d_modle": 16}, "model.d_modle: unknown key", "d_model"),
    C("unknown key", "metrics-typo", {"metrics.shared_treshold": 0.5}, "metrics.shared_treshold"),
    C("unknown key", "arch-typo", {"architectures.topk.kk": 3}, "architectures.topk.kk: unknown"),
    # ---- empty lists and mappings -----------------------------------------------------------
    C("empty list", "steps", {"model.steps": []}, "model.steps", "non-empty"),
    C("empty list", "layers", {"activations.layers": []}, "activations.layers", "non-empty"),
    C("empty list", "seeds", {"training.seeds": []}, "training.seeds", "at least two"),
    C("empty list", "architectures", {"architectures": {}}, "architectures", "non-empty"),
    C("empty list", "formats", {"figures.formats": []}, "figures.formats", "at least 1"),
    C("empty list", "organism-seeds", {"validation.organism_seeds": []}, "organism_seeds"),
    C(
        "empty list",
        "data-files",
        {"corpus": {"source": "files", "data_files": []}},
        "corpus.data_files",
    ),
    C("empty list", "null-layers", {"activations.layers": None}, "activations.layers"),
    # ---- out of range -----------------------------------------------------------------------
    C("out of range", "zero-latents", {"training.n_latents": 0}, "training.n_latents", "than 0"),
    C("out of range", "negative-tokens", {"training.train_tokens": -1}, "training.train_tokens"),
    C("out of range", "context-1", {"tokens.context_length": 1}, "tokens.context_length"),
    C("out of range", "dpi-0", {"figures.dpi": 0}, "figures.dpi", "greater than 0"),
    C("out of range", "fraction-over-1", {"training.lr_decay_fraction": 1.5}, "lr_decay_fraction"),
    C("out of range", "threshold-over-1", {"metrics.shared_threshold": 1.2}, "shared_threshold"),
    C(
        "out of range",
        "warmup-plus-decay",
        {"training.lr_warmup_fraction": 0.9},
        "training.lr_warmup_fraction",
        "overlap",
    ),
    C("out of range", "beta-1", {"training.adam_betas": [0.9, 1.0]}, "training.adam_betas"),
    C("out of range", "duplicate-seeds", {"training.seeds": [0, 0]}, "training.seeds", "distinct"),
    C("out of range", "negative-seed", {"training.seeds": [-1, 0]}, "training.seeds", ">= 0"),
    C("out of range", "duplicate-steps", {"model.steps": [0, 0]}, "model.steps", "distinct"),
    C("out of range", "duplicate-layers", {"activations.layers": [1, 1]}, "activations.layers"),
    C("out of range", "dup-organism", {"validation.organism_seeds": [1, 1]}, "organism_seeds"),
    C("out of range", "batch-over-tokens", {"training.batch_size": 10**9}, "training.batch_size"),
    C(
        "out of range",
        "k-not-below-latents",
        {"architectures.topk.k": 64},
        "architectures.topk",
        "64",
    ),
    C("out of range", "heads", {"model.num_heads": 3}, "model", "not divisible by num_heads"),
    C("out of range", "vocab", {"model.vocab_size": 10}, "model.vocab_size"),
    # ---- unknown architectures --------------------------------------------------------------
    C(
        "unknown architecture",
        "typo",
        {"architectures.topk.architecture": "topkk"},
        "architectures.topk.architecture",
        "'topkk' is not registered; allowed: ",
    ),
    C(
        "unknown architecture",
        "case",
        {"architectures.topk.architecture": "TopK"},
        "architectures.topk.architecture",
        "allowed: ",
    ),
    C(
        "unknown architecture",
        "new-entry",
        {"architectures.sparse": {"architecture": "sparse"}},
        "architectures.sparse.architecture",
        "not registered",
    ),
    C(
        "unknown architecture",
        "missing",
        {"architectures.topk.architecture": DELETE},
        "architectures.topk",
        "needs a key 'architecture'",
    ),
    C(
        "unknown architecture",
        "not-a-mapping",
        {"architectures.topk": "topk"},
        "architectures.topk",
        "needs a key 'architecture'",
    ),
    # ---- layers the model does not have -----------------------------------------------------
    C("layer beyond the model", "micro", {"activations.layers": [0, 2]}, "activations.layers"),
    C("layer beyond the model", "negative", {"activations.layers": [-1]}, "activations.layers"),
    C(
        "layer beyond the model",
        "pythia-70m",
        {"model": PYTHIA_70M, "activations.layers": [1, 6]},
        "activations.layers",
        "the model has 6 layers",
    ),
    C(
        "layer beyond the model",
        "pythia-1b",
        {"model": {**PYTHIA_70M, "repo_id": "EleutherAI/pythia-1b"}, "activations.layers": [16]},
        "activations.layers",
        "the model has 16 layers",
    ),
    C(
        "layer beyond the model",
        "other-hub",
        {"model": OTHER_HUB, "activations.layers": [4]},
        "activations.layers",
        "the model has 4 layers",
    ),
    # ---- steps that are not Pythia revisions (or not saved by the micro suite) ---------------
    C(
        "step not a revision",
        "1500",
        {"model": {**PYTHIA_70M, "steps": [0, 1500]}},
        "model.steps",
        "steps [1500] are not Pythia revisions",
    ),
    C(
        "step not a revision",
        "143001",
        {"model": {**PYTHIA_70M, "steps": [143000, 143001]}},
        "model.steps",
        "steps [143001] are not Pythia revisions",
    ),
    C(
        "step not a revision",
        "3",
        {"model": {**PYTHIA_70M, "steps": [2, 3, 4]}},
        "model.steps",
        "steps [3] are not Pythia revisions",
    ),
    C(
        "step not a revision",
        "negative",
        {"model": {**PYTHIA_70M, "steps": [-1000, 0]}},
        "model.steps",
        "not Pythia revisions",
    ),
    C(
        "step not a revision",
        "negative-other-hub",
        {"model": {**OTHER_HUB, "steps": [-5, 0]}},
        "model.steps",
        ">= 0",
    ),
    C(
        "step not a revision",
        "micro",
        {"model.steps": [0, 7]},
        "model.steps",
        "not saved by the micro",
    ),
    # ---- hostile values: paths escaping the results folder ----------------------------------
    C("path escaping results", "study-dotdot", {"study": "../x"}, "study", "folder name"),
    C("path escaping results", "study-slash", {"study": "a/b"}, "study", "folder name"),
    C("path escaping results", "study-absolute", {"study": "/tmp/x"}, "study"),
    C("path escaping results", "study-dot", {"study": "."}, "study"),
    C("path escaping results", "study-empty", {"study": ""}, "study"),
    C(
        "path escaping results",
        "arch-dotdot",
        {"architectures": {"../x": TINY["architectures"]["topk"]}},
        "architecture name '../x'",
        "folder",
    ),
    C(
        "path escaping results",
        "arch-slash",
        {"architectures": {"a/b": TINY["architectures"]["topk"]}},
        "architecture name 'a/b'",
    ),
    C(
        "path escaping results",
        "arch-absolute",
        {"architectures": {"/x": TINY["architectures"]["topk"]}},
        "architecture name '/x'",
    ),
    C("path escaping results", "results-empty", {"results": ""}, "results", "filesystem root"),
    C("path escaping results", "results-home", {"results": "~/results"}, "results", "'~'"),
    C("path escaping results", "results-braces", {"results": "out/{step}"}, "results"),
    C("path escaping results", "results-space", {"results": "my results"}, "results", "shell"),
    C("path escaping results", "results-shell", {"results": "r;touch x"}, "results", "shell"),
    C(
        "path escaping results",
        "repo-id",
        {"model": {**OTHER_HUB, "repo_id": "../../x"}},
        "model.repo_id",
        "not a Hugging Face repo id",
    ),
    C(
        "path escaping results",
        "revision",
        {"model": {**PYTHIA_70M, "revision": "../../x/step{step}"}},
        "model.revision",
        "not a git revision",
    ),
    C(
        "path escaping results",
        "tokenizer-revision",
        {"model": {**PYTHIA_70M, "tokenizer_revision": "/etc/passwd"}},
        "model.tokenizer_revision",
    ),
    # ---- hostile values: remote code --------------------------------------------------------
    C("remote code", "model", {"model.trust_remote_code": True}, "model.trust_remote_code", NEVER),
    C("remote code", "top-level", {"trust_remote_code": True}, "trust_remote_code", NEVER),
    C("remote code", "corpus", {"corpus.trust_remote_code": True}, "corpus.trust_remote", NEVER),
    C(
        "remote code",
        "hub-model",
        {"model": {**PYTHIA_70M, "trust_remote_code": True}},
        "model.trust_remote_code",
        NEVER,
    ),
    C(
        "remote code",
        "architecture",
        {"architectures.topk.trust_remote_code": True},
        "architectures.topk.trust_remote_code",
        NEVER,
    ),
    C("remote code", "false", {"model.trust_remote_code": False}, "model.trust_remote", NEVER),
    # ---- revision templates that would load one revision for every step ---------------------
    C(
        "revision template",
        "no-step",
        {"model": {**PYTHIA_70M, "revision": "main"}},
        "model.revision",
        "must contain {step}",
    ),
    C(
        "revision template",
        "typo",
        {"model": {**PYTHIA_70M, "revision": "step{stp}"}},
        "model.revision",
        "must contain {step}",
    ),
    C(
        "revision template",
        "literal",
        {"model": {**PYTHIA_70M, "revision": "step"}},
        "model.revision",
        "every step would load the same revision",
    ),
    C(
        "revision template",
        "positional",
        {"model": {**PYTHIA_70M, "revision": "step{step}-{0}"}},
        "model.revision",
    ),
    C(
        "revision template",
        "unbalanced",
        {"model": {**PYTHIA_70M, "revision": "step{step}}"}},
        "model.revision",
    ),
    # ---- files that are not a YAML mapping --------------------------------------------------
    C("not a YAML mapping", "list", "- study\n- tiny\n", FILE, "expected a mapping"),
    C("not a YAML mapping", "string", "tiny study\n", FILE, "expected a mapping"),
    C("not a YAML mapping", "empty", "", FILE, "expected a mapping"),
    C("not a YAML mapping", "unclosed", "study: [tiny\n", FILE, "not valid YAML: line 2"),
    C("not a YAML mapping", "not-utf8", b"study: \xbc\xbd\n", FILE, "not valid YAML"),
    C("not a YAML mapping", "tab", "study: tiny\n\tresults: r\n", FILE, "not valid YAML: line 2"),
    C(
        "not a YAML mapping",
        "python-tag",
        "study: !!python/object/apply:os.system ['touch pwned']\n",
        FILE,
        "could not determine a constructor",
    ),
]
# Snakemake reads --configfile itself before the workflow starts; on these files it crashes (with a
# traceback, still before any job and without writing anything): a Snakemake bug, not ours
SNAKEMAKE_CRASHES = {"not-utf8": "UnicodeDecodeError: 'utf-8' codec can't decode"}
CATEGORIES = Counter(case.category for case in CASES)
# the first case of each category goes through the real entry points in the fast test
REPRESENTATIVE = [next(c for c in CASES if c.category == cat) for cat in CATEGORIES]


def ids(cases):
    return [f"{c.category.replace(' ', '-')}:{c.id}" for c in cases]


def write_case(case: Case, folder: Path) -> Path:
    path = folder / f"{case.category.replace(' ', '-')}-{case.id}.yaml"
    text = case.raw_text()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def expected_name(case: Case, path: Path) -> str:
    return str(path) if case.names == FILE else case.names


def assert_short(message: str) -> None:
    """One paragraph: no traceback, no pydantic boilerplate, a few lines of sane width."""
    assert "Traceback" not in message and 'File "' not in message, message
    assert "errors.pydantic.dev" not in message and "type=" not in message, message
    lines = message.strip().splitlines()
    assert len(lines) <= 6 and all(len(line) <= 300 for line in lines), message


def test_every_category_has_cases():
    for category, n in CATEGORIES.items():
        print(f"{category}: {n} cases")
    print(f"{len(CASES)} malformed-config cases in {len(CATEGORIES)} categories")
    assert len(CATEGORIES) == 11 and min(CATEGORIES.values()) >= 3, CATEGORIES
    assert len(set(ids(CASES))) == len(CASES)


def test_the_bases_are_valid(tmp_path):
    """The cases fail because of their change, not because of the config they change."""
    load_config(REPO / "workflow/configs/tiny.yaml")
    for model in (PYTHIA_70M, OTHER_HUB):
        ok = Case("", "", {"model": model, "activations.layers": [0, 1]}, "")
        load_config(write_case(ok, tmp_path))


@pytest.mark.parametrize(
    "results", ["/tmp/elsewhere/results", "../sibling", "results-2024", "out/v1.2_x+y@z"]
)
def test_results_may_be_any_folder_the_user_names(results):
    cfg = load_config({**copy.deepcopy(TINY), "results": results})
    assert cfg.root == f"{results}/tiny"


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_load_config_names_the_key(case, tmp_path):
    path = write_case(case, tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message  # the file, always
    assert expected_name(case, path) in message and case.says in message, message
    assert_short(message)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_the_cli_stops_before_any_work(case, tmp_path, capsys):
    """`check-config` and a stage given the config exit 1 with the message, and write nothing."""
    path = write_case(case, tmp_path)
    out = tmp_path / "results"
    stage = ["tokens", "--config", path, "--out-tokens", out / "t.parquet", "--out-tokenizer", out]
    for argv in (["check-config", path], stage):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected_name(case, path) in err, err
        assert_short(err)
    assert sorted(tmp_path.iterdir()) == [path]


# ---- the real entry points, in a copy of the workflow ------------------------------------------------


WRAPPER = ("saedynamics", "snakemake")  # python -m saedynamics snakemake: Snakemake, args checked


def entry_point_runs(
    cases: list[Case], tmp_path: Path, overrides=(), dry_runs=()
) -> dict[str, dict]:
    """Run `snakemake --cores 1 --configfile <case>`, the same through `python -m saedynamics
    snakemake` ("wrapper": for the cases of a bad file, where it acts, and the representative
    ones) and `python -m saedynamics tokens --config <case> ...` for every case,
    and `snakemake --cores 1 --config <override>` (and through the wrapper) for every override
    (merged into the embedded demo config), in a copy of the workflow (tests/entry_points.py: one
    warm interpreter for all runs); assert that they created no file there (the results folder
    included), and a dry run (`-n -p`) through the wrapper for each tuple of --config entries in
    `dry_runs`; return
    {case id, override or dry run: {"snakemake" | "wrapper" | "cli": (rc, output)}}."""
    wd = copy_workflow(tmp_path / "wd")
    configs = tmp_path / "configs"
    configs.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs = []

    def job(key: str, kind: str, path: str, *argv: str) -> None:
        log = str(logs / f"{len(jobs)}.log")
        jobs.append(
            {"key": key, "kind": kind, "path": path, "argv": argv, "cwd": str(wd), "log": log}
        )

    outputs = ["--out-tokens", "results/tiny/tokens", "--out-tokenizer", "results/tiny/t"]
    for case, case_id in zip(cases, ids(cases), strict=True):
        path = str(write_case(case, configs))
        job(case_id, "snakemake", path, "snakemake", "--cores", "1", "--configfile", path)
        if case.names == FILE or case in REPRESENTATIVE:  # else the wrapper only hands it on
            job(case_id, "wrapper", path, *WRAPPER, "--cores", "1", "--configfile", path)
        job(case_id, "cli", path, "saedynamics", "tokens", "--config", path, *outputs)
    for override in overrides:
        job(override, "snakemake", "", "snakemake", "--cores", "1", "--config", override)
        job(override, "wrapper", "", *WRAPPER, "--cores", "1", "--config", override)
    for entries in dry_runs:  # each: a tuple of --config entries
        argv = (*WRAPPER, "-n", "-p", "--cores", "1", "--config", *entries)
        job(" ".join(entries), "wrapper", "", *argv)
    before = sorted(p for p in wd.rglob("*") if ".snakemake" not in p.parts)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(wd / "src")}
    subprocess.run(
        [sys.executable, str(REPO / "tests/entry_points.py"), str(tmp_path / "jobs.json")],
        env=env,
        check=True,
        timeout=1200,
    )
    after = sorted(p for p in wd.rglob("*") if ".snakemake" not in p.parts)
    assert after == before, f"created: {sorted(set(after) - set(before))}"
    runs: dict[str, dict] = {}
    for done in json.loads((tmp_path / "jobs.json").read_text()):
        run = runs.setdefault(done["key"], {"path": done["path"]})
        run[done["kind"]] = (done["rc"], Path(done["log"]).read_text())
    return runs


def check_entry_points(case: Case, run: dict) -> None:
    name = expected_name(case, Path(run["path"]))
    rc, out = run["cli"]
    assert rc == 1 and "Traceback" not in out, out
    message = out[out.index("error: ") :]
    assert name in message and case.says in message, out
    assert_short(message)
    if "wrapper" in run:  # reads the file before Snakemake: every case named, no traceback
        rc, out = run["wrapper"]
        assert rc != 0 and "Traceback (most recent call last)" not in out, out
        assert name in out and case.says in out and len(out.strip().splitlines()) <= 8, out
    rc, out = run["snakemake"]
    if case.id in SNAKEMAKE_CRASHES:
        assert rc != 0 and SNAKEMAKE_CRASHES[case.id] in out, out
        return
    assert rc != 0 and "Traceback (most recent call last)" not in out, out
    assert len(out.strip().splitlines()) <= 8, out
    if case.names == FILE and "Config file" in out:
        # Snakemake reads the file itself before the workflow starts, and stops with its own
        # one-line message ("Config file is not valid JSON or YAML", "... with keys at top
        # level"), which names no file; the CLI's names the file, line and column
        return
    assert name in out and case.says in out, out


def test_real_entry_points_stop_before_any_job(tmp_path):
    """One case per category through `snakemake` and `python -m saedynamics`; and bad values given
    with Snakemake's --config. (tests/test_workflow.py runs a bad config through a plain
    `python -m snakemake` subprocess too.)"""
    not_an_int = "training.n_latents: Input should be a valid integer (got 'many')"
    overrides = {
        "study=../x": "study: '../x' must be lower",
        "results=~/r": "results: '~/r'",
        "training={n_latents: many}": not_an_int,
        "training.n_latents=many": not_an_int,  # dotted: the wrapper's alone
        "architectures.topk.k=0": "architectures.topk.k: Input should be greater than 0",
    }
    dry_run = ("training.n_latents=48", "architectures.topk.k=3")
    runs = entry_point_runs(REPRESENTATIVE, tmp_path, overrides, [dry_run])
    for case, case_id in zip(REPRESENTATIVE, ids(REPRESENTATIVE), strict=True):
        check_entry_points(case, runs[case_id])
    for override, message in overrides.items():
        dotted = "." in override.partition("=")[0]
        for kind in ("wrapper",) if dotted else ("snakemake", "wrapper"):
            rc, out = runs[override][kind]
            assert rc != 0 and "Traceback (most recent call last)" not in out, out
            assert message in out and len(out.strip().splitlines()) <= 8, out
    rc, out = runs[" ".join(dry_run)]["wrapper"]  # dotted keys that are fine: read as numbers
    assert rc == 0 and '"n_latents": 48' in out and '"k": 3' in out, out


@pytest.mark.slow
def test_every_case_through_the_real_entry_points(tmp_path):
    runs = entry_point_runs(CASES, tmp_path)
    for case, case_id in zip(CASES, ids(CASES), strict=True):
        check_entry_points(case, runs[case_id])


# ---- command-line arguments ------------------------------------------------------------------------


def test_train_names_an_architecture_the_config_lacks(tmp_path, capsys):
    """`train --architecture` with a name the config (or the settings) lacks: the option, the
    config and the names it has; nothing written."""
    config = REPO / "workflow/configs/tiny.yaml"
    settings = json.dumps(load_config(config).stage_settings("train"))
    argv = ["train", "--step", "0", "--layer", "0", "--architecture", "batchtopk"]
    argv += ["--out", str(tmp_path / "saes"), "--activations", str(tmp_path / "train.parquet")]
    for source, where in (("--config", str(config)), ("--settings", "--settings")):
        capsys.readouterr()
        assert main([*argv, source, str(config) if source == "--config" else settings]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "KeyError" not in err, err
        assert err.strip().splitlines()[-1] == (
            f"error: --architecture 'batchtopk' is not in the architectures of {where}; "
            "it has: topk, relu"
        )
    assert not list(tmp_path.iterdir())


def snakemake_config(**entries: str) -> dict:
    """What Snakemake makes of `--config KEY=VALUE ...` whose VALUE is a mapping: YAML's
    BaseLoader, which leaves every scalar inside a string (snakemake.cli.parse_config)."""
    return {key: yaml.load(value, Loader=yaml.BaseLoader) for key, value in entries.items()}


def with_overrides(overrides: dict) -> dict:
    """The tiny config with `overrides` deep-merged in, as Snakemake merges --config."""

    def merge(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) else value
        return into

    return merge(copy.deepcopy(TINY), copy.deepcopy(overrides))


def test_config_overrides_are_read_as_the_schema_types():
    """`snakemake --config 'training={n_latents: 32}'` hands '32' over: read as the number (bool,
    null, list of numbers) the schema wants at that key, the architectures' own keys included."""
    overrides = snakemake_config(
        training="{n_latents: 32, seeds: [0, 1], checkpoint_tokens: null, deterministic: true, "
        "lr_warmup_fraction: 0.05, train_tokens: 2e4, adam_betas: [0.8, 0.99]}",
        architectures="{topk: {k: 8}, relu: {l1_coefficient: 2}}",
        model="{steps: [0, 40]}",
    )
    assert overrides["training"]["n_latents"] == "32"  # what Snakemake passes
    cfg = load_config(coerce_overrides(with_overrides(overrides), overrides))
    t = cfg.training
    assert (t.n_latents, t.seeds, t.checkpoint_tokens, t.deterministic) == (32, [0, 1], None, True)
    assert (t.lr_warmup_fraction, t.train_tokens, t.adam_betas) == (0.05, 20000, (0.8, 0.99))
    assert cfg.architectures["topk"].k == 8 and cfg.architectures["relu"].l1_coefficient == 2.0
    assert cfg.model.steps == [0, 40]
    # only the keys the command line set: the same string in a config file stays refused
    raw = with_overrides({"tokens": {"context_length": "32"}})
    with pytest.raises(ConfigError, match="tokens.context_length: Input should be a valid int"):
        load_config(coerce_overrides(raw, snakemake_config(training="{n_latents: 32}")))


@pytest.mark.parametrize(
    "entries, says",
    [
        ({"training": "{n_latents: many}"}, "training.n_latents: Input should be a valid integer"),
        ({"training": "{n_latents: 3.5}"}, "training.n_latents: Input should be a valid integer"),
        (
            {"training": "{deterministic: maybe}"},
            "training.deterministic: Input should be a valid b",
        ),
        ({"training": "{seeds: [0, x]}"}, "training.seeds.1: Input should be a valid integer"),
        (
            {"architectures": "{topk: {lr: fast}}"},
            "architectures.topk.lr: Input should be a valid n",
        ),
        ({"model": "{steps: [0, x]}"}, "model.steps.1: Input should be a valid integer"),
    ],
)
def test_config_overrides_that_are_no_number_name_the_key(entries, says):
    overrides = snakemake_config(**entries)
    with pytest.raises(ConfigError) as error:
        load_config(coerce_overrides(with_overrides(overrides), overrides), name="the demo")
    assert says in str(error.value), error.value
    assert_short(str(error.value))


# ---- python -m saedynamics snakemake: what Snakemake reads before the workflow --------------------


@pytest.mark.parametrize(
    "entry, rewritten",
    [
        ("training.n_latents=32", "training={n_latents: '32'}"),
        ("architectures.topk.k=4", "architectures={topk: {k: '4'}}"),
        ("training.seeds=[0, 5]", "training={seeds: ['0', '5']}"),
        ("training.checkpoint_tokens=", "training={checkpoint_tokens: null}"),
        ("study=tiny", "study=tiny"),  # no dot: Snakemake's own form, unchanged
        ("training={n_latents: 32}", "training={n_latents: 32}"),
        ("no-equals-sign", "no-equals-sign"),  # Snakemake names what is missing
    ],
)
def test_dotted_config_keys_become_snakemake_mappings(entry, rewritten):
    assert dotted_entry(entry) == rewritten


def test_dotted_config_keys_are_read_as_the_schema_types():
    """Dotted entries, rewritten, through Snakemake's own parser and the workflow's reading: the
    numbers and lists the schema wants; mappings for one top-level key merge."""
    argv = ["-n", "--config", "training.n_latents=32", "training.seeds=[0, 1]"]
    argv += ["architectures.topk.k=8", "--cores", "1"]
    entries = check_arguments(argv)[2:5]
    overrides = snakemake_parse_config(entries)
    assert overrides["training"] == {"n_latents": "32", "seeds": ["0", "1"]}
    cfg = load_config(coerce_overrides(with_overrides(overrides), overrides))
    assert (cfg.training.n_latents, cfg.training.seeds) == (32, [0, 1])
    assert (
        cfg.architectures["topk"].k == 8
        and cfg.architectures["relu"]
        == load_config(REPO / "workflow/configs/tiny.yaml").architectures["relu"]
    )


def test_the_wrapper_keeps_every_other_argument(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: s\n")
    argv = ["all", "--cores", "2", f"--configfile={study}", "figures", "-C", "a.b=1", "-n"]
    assert check_arguments(argv) == [*argv[:3], f"--configfile={study}", "figures", "-C"] + [
        "a={b: '1'}",
        "-n",
    ]
    two = ["--configfiles", str(study), str(study), "--config=x.y=", "all"]
    assert check_arguments(two) == [*two[:3], "--config=x={y: null}", "all"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--configfile", "missing.yaml"], "--configfile missing.yaml: cannot read config file "),
        (
            ["--configfiles", "bad.yaml"],
            "--configfiles bad.yaml: config file bad.yaml is not valid ",
        ),
        (["-C", "training..n_latents=3"], "--config training..n_latents=3: 'training..n_latents'"),
        (["--config", "training.seeds=[0"], "--config training.seeds=[0: the value '[0' is not "),
    ],
)
def test_the_wrapper_names_the_argument(argv, says, tmp_path, capsys, monkeypatch):
    """`python -m saedynamics snakemake ...` stops before Snakemake starts: one line naming the
    file or entry, exit 1, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_bytes(b"study: \xbc\xbd\n")  # Snakemake's traceback case
    assert main(["snakemake", "-n", "--cores", "1", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# ---- a Hub checkpoint that needs remote code ------------------------------------------------------


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


AUTO_MAP = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def test_a_checkpoint_needing_remote_code_is_refused(hub_copy, tmp_path, capsys):
    """config.json with an auto_map (Transformers would silently load its own GPT-NeoX instead of
    the repository's classes) or an unknown model_type: the checkpoint rule refuses it naming the
    file, and writes nothing."""
    raw = hub_config(tmp_path, hub_copy)
    settings = json.dumps(load_config(raw).stage_settings("checkpoint"))
    edit_json(snapshot_of(hub_copy, 0) / "config.json", auto_map=AUTO_MAP)
    edit_json(snapshot_of(hub_copy, 1) / "config.json", model_type="evil_neox")
    for step, why in [(0, "its auto_map names classes"), (1, "its model_type 'evil_neox' is not")]:
        out = tmp_path / f"step{step}"
        capsys.readouterr()
        before = sorted(tmp_path.iterdir())
        argv = ["checkpoint", "--settings", settings, "--step", str(step), "--out", str(out)]
        assert main(argv) == 1
        err = capsys.readouterr().err
        message = err[err.rindex("error: ") :].strip()
        assert f"{snapshot_of(hub_copy, step) / 'config.json'}: {why}" in message, message
        assert "never runs remote code (trust_remote_code is always off)" in message
        assert "\n" not in message and "Traceback" not in err
        assert sorted(tmp_path.iterdir()) == before, "partial output"


def test_loading_a_checkpoint_needing_remote_code_is_refused(hub_copy, tmp_path):
    """A checkpoint directory whose files were changed after download (manifest updated too):
    load_model refuses it before Transformers reads it; a tokenizer asking for its own code too."""
    model = HubModelConfig(**hub_config(tmp_path, hub_copy)["model"])
    ckpt = tmp_path / "ckpt"
    download_checkpoint(model, 2, ckpt, [])
    edit_json(ckpt / "config.json", auto_map=AUTO_MAP)
    manifest = read_json(ckpt / "manifest.json")
    manifest["files"]["config.json"] = sha256_file(ckpt / "config.json")
    write_json(ckpt / "manifest.json", manifest)
    with pytest.raises(DataError) as error:
        load_model(ckpt)
    assert str(error.value).startswith(f"{ckpt / 'config.json'}: its auto_map names classes")
    assert "modeling_evil.EvilForCausalLM" in str(error.value)

    edit_json(
        snapshot_of(hub_copy, 2) / "tokenizer_config.json",
        auto_map={"AutoTokenizer": ["x.T", None]},
    )
    (tmp_path / "tok").mkdir()
    with pytest.raises(DataError, match="tokenizer_config.json: its auto_map names classes"):
        download_tokenizer(model, tmp_path / "tok")
    assert not list((tmp_path / "tok").iterdir())
