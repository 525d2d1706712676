"""Provenance on every artifact: each format's encoding read back, the git commit, the whole study."""

from __future__ import annotations

import json
import subprocess
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import saedynamics
from saedynamics import artifacts, figures
from saedynamics.activations import ActivationFile, ActivationWriter
from saedynamics.artifacts import (
    GIT_COMMIT_ENV,
    MANIFEST,
    PROVENANCE_FIELDS,
    checkout_commit,
    git_commit,
    provenance,
    write_json,
    write_parquet,
    write_safetensors,
)
from saedynamics.checkpoints import download_checkpoint
from saedynamics.config import FiguresConfig, load_config
from saedynamics.corpus import build_token_sample, load_tokenizer
from saedynamics.errors import DataError
from saedynamics.saes import load

from .conftest import hub_config
from .provenance_check import assert_every_artifact_has_provenance, read_provenance
from .synthetic import make_sae

# a container path with characters that each format must escape (PDF parentheses, XML, JSON)
PROVENANCE = {
    "config_hash": "0123456789abcdef",
    "package_version": saedynamics.__version__,
    "git_commit": "abc123-dirty",
    "container": '/images/sae (v1) \\ <"&>.sif',
}


# ---- each format ------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"value": 1}, PROVENANCE)
    assert read_provenance(tmp_path / "a.json") == PROVENANCE
    assert json.loads((tmp_path / "a.json").read_text())["value"] == 1
    with pytest.raises(ValueError, match="already has a 'provenance' key"):
        write_json(tmp_path / "b.json", {"provenance": {}}, PROVENANCE)


def test_parquet_round_trip_keeps_existing_metadata(tmp_path):
    df = pd.DataFrame({"step": [0, 16], "fvu": [0.5, 0.25]})
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**table.schema.metadata, b"saedynamics": b'{"x": 1}'})
    write_parquet(tmp_path / "t.parquet", table, PROVENANCE, compression="zstd")
    assert read_provenance(tmp_path / "t.parquet") == PROVENANCE
    metadata = pq.read_schema(tmp_path / "t.parquet").metadata
    assert metadata[b"saedynamics"] == b'{"x": 1}' and b"pandas" in metadata
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)


def test_activation_writer_records_provenance(tmp_path):
    writer = ActivationWriter(tmp_path / "a.parquet", 4, {"step": 0}, 8, provenance=PROVENANCE)
    idx = np.arange(20, dtype=np.int32)
    writer.append(idx, idx, idx, torch.randn(20, 4))
    writer.close()
    assert read_provenance(tmp_path / "a.parquet") == PROVENANCE
    acts = ActivationFile(tmp_path / "a.parquet")  # its own metadata is intact
    assert acts.metadata["step"] == 0 and acts.metadata["norm"]["n_rows"] == 20


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    write_safetensors(tmp_path / "w.safetensors", tensors, PROVENANCE, metadata={"format": "pt"})
    assert read_provenance(tmp_path / "w.safetensors") == PROVENANCE
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensors["w"])


def test_sae_directory_records_provenance_and_still_loads(tmp_path):
    sae = make_sae("topk", k=4)
    sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 0}, PROVENANCE)
    assert read_provenance(tmp_path / "sae/cfg.json") == PROVENANCE
    assert read_provenance(tmp_path / "sae/sae_weights.safetensors") == PROVENANCE
    loaded = load(tmp_path / "sae")
    assert loaded.provenance["seed"] == 0
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_figure_round_trip(tmp_path, fmt):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on PDF info keys it does not know
        (path,) = figures._save(fig, tmp_path, "f", FiguresConfig(formats=[fmt]), PROVENANCE)
    assert path.name == f"f.{fmt}"
    assert read_provenance(path) == PROVENANCE


def test_directory_artifact_reads_its_manifest(tmp_path):
    write_json(tmp_path / "ckpt" / MANIFEST, {"files": {}}, PROVENANCE)
    assert read_provenance(tmp_path / "ckpt") == PROVENANCE
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=f"bare: a directory artifact without {MANIFEST}"):
        read_provenance(tmp_path / "bare")


def test_files_without_provenance_are_named(tmp_path):
    cases = {
        "plain.json": lambda p: write_json(p, {"value": 1}),
        "plain.parquet": lambda p: write_parquet(p, pa.table({"a": [1]}), None),
        "plain.safetensors": lambda p: write_safetensors(p, {"w": torch.zeros(1)}, None),
        "partial.json": lambda p: write_json(p, {}, {"config_hash": "0"}),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(DataError, match=f"{name}: (records no|its provenance)"):
            read_provenance(tmp_path / name)
    fig = plt.figure()
    fig.savefig(tmp_path / "plain.png")
    fig.savefig(tmp_path / "plain.pdf")
    plt.close(fig)
    for name in ("plain.png", "plain.pdf"):
        with pytest.raises(DataError, match=f"{name}: records no saedynamics provenance"):
            read_provenance(tmp_path / name)
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="corrupt.parquet: cannot read its provenance"):
        read_provenance(tmp_path / "corrupt.parquet")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: no provenance reader for .txt"):
        read_provenance(tmp_path / "notes.txt")


def test_hub_tokenizer_and_converted_checkpoint_record_provenance(offline_hub, tmp_path):
    """The Hub path, which the tiny study does not take: tokenizer directory, converted weights."""
    cfg = load_config(hub_config(tmp_path, offline_hub))
    tokens, tokenizer = tmp_path / "tokens", tmp_path / "tokenizer"
    build_token_sample(cfg.corpus, cfg.tokens, cfg.model, tokens, tokenizer, PROVENANCE)
    assert read_provenance(tokens) == read_provenance(tokenizer) == PROVENANCE
    assert load_tokenizer(tokenizer)("the quick fox")["input_ids"]  # HF ignores the manifest
    # step2 ships pickled weights only: we write its model.safetensors, so it records provenance
    manifest = download_checkpoint(cfg.model, 2, tmp_path / "step2", [], PROVENANCE)
    assert manifest["provenance"] == read_provenance(tmp_path / "step2") == PROVENANCE
    assert read_provenance(tmp_path / "step2/model.safetensors") == PROVENANCE
    with safe_open(tmp_path / "step2/model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers checks before loading


# ---- what goes into it ------------------------------------------------------------------------------


def test_provenance_records_the_container(monkeypatch):
    monkeypatch.delenv("SINGULARITY_CONTAINER", raising=False)
    monkeypatch.setenv("APPTAINER_CONTAINER", "/img.sif")
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123")
    record = provenance({"b": 1, "a": 2})
    assert set(record) == set(PROVENANCE_FIELDS)
    assert record["container"] == "/img.sif" and record["git_commit"] == "abc123"
    assert record["config_hash"] == provenance({"a": 2, "b": 1})["config_hash"]
    monkeypatch.delenv("APPTAINER_CONTAINER")
    assert provenance({})["container"] is None


def test_git_commit_prefers_the_environment(monkeypatch):
    monkeypatch.setattr(artifacts, "_package_checkout_commit", lambda: "from-git")
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abc")
    assert git_commit() == "0123abc"
    for unset in ("", "  "):  # set but empty: ask git
        monkeypatch.setenv(GIT_COMMIT_ENV, unset)
        assert git_commit() == "from-git"
    monkeypatch.delenv(GIT_COMMIT_ENV)
    assert git_commit() == "from-git"


def test_git_is_asked_once_per_process(monkeypatch):
    calls = []
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    monkeypatch.setattr(artifacts, "checkout_commit", lambda d: calls.append(d) or "sha")
    artifacts._package_checkout_commit.cache_clear()
    try:
        assert git_commit() == git_commit() == "sha"
        assert len(calls) == 1
    finally:
        artifacts._package_checkout_commit.cache_clear()


def _git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_checkout_commit_marks_a_dirty_tree(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "tracked.txt").write_text("one\n")
    _git(repo, "add", "tracked.txt")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD")
    (repo / "sub").mkdir()
    assert checkout_commit(repo) == checkout_commit(repo / "sub") == sha
    (repo / "untracked.txt").write_text("new\n")  # untracked files do not make it dirty
    assert checkout_commit(repo) == sha
    (repo / "tracked.txt").write_text("two\n")
    assert checkout_commit(repo) == f"{sha}-dirty"
    (tmp_path / "plain").mkdir()  # not a checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert checkout_commit(tmp_path / "plain") is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git at all
    assert checkout_commit(repo) is None


# ---- the checker, and a whole study ----------------------------------------------------------------


def _fake_study(root, record):
    write_json(root / "metrics/step0/layer0/topk/reconstruction.json", {"seeds": []}, record)
    write_parquet(root / "tables/reconstruction.parquet", pa.table({"a": [1]}), record)
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text("{}")  # third-party: vouched for by the manifest
    (tokenizer / ".snakemake_timestamp").touch()
    write_json(tokenizer / MANIFEST, {"files": {"tokenizer.json": "..."}}, record)
    (root / "logs").mkdir()
    (root / "logs/tokens.log").write_text("no provenance in logs")
    (root / ".tables.parquet.tmp").touch()


def test_checker_accepts_a_complete_study_and_names_what_is_missing(tmp_path):
    root = tmp_path / "study"
    _fake_study(root, PROVENANCE)
    checked = assert_every_artifact_has_provenance(root, PROVENANCE["container"], "abc123-dirty")
    assert [p.relative_to(root).as_posix() for p in checked] == [
        "metrics/step0/layer0/topk/reconstruction.json",
        "tables/reconstruction.parquet",
        "tokenizer",
    ]
    with pytest.raises(AssertionError, match="container '/images.*', expected None"):
        assert_every_artifact_has_provenance(root, None)
    write_json(root / "tables/reconstruction.json", {"rows": []})
    (root / "tokenizer/vocab.txt").write_text("")
    with pytest.raises(AssertionError) as failed:
        assert_every_artifact_has_provenance(root, PROVENANCE["container"])
    assert "tables/reconstruction.json: records no saedynamics provenance" in str(failed.value)
    assert "tokenizer: manifest.json lists ['tokenizer.json']" in str(failed.value)
