"""Integrity: checkpoints against their manifest's sha256, activation files against Parquet's page
checksums (CRC32), and malformed inputs (truncated or flipped Parquet, missing tensors, layers or columns, shapes that
do not match) failing before any compute, with one message naming the file and what is wrong, and
leaving nothing at the output path of the stage that failed.

The cases are listed in MALFORMED; `test_every_malformed_case_is_tried` checks that each is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from saedynamics.activations import METADATA_KEY, ActivationFile, schema
from saedynamics.artifacts import (
    read_json,
    sha256_file,
    write_json,
)
from saedynamics.checkpoints import download_checkpoint, load_model, verify_checkpoint
from saedynamics.cli import main
from saedynamics.config import load_config
from saedynamics.corpus import build_token_sample
from saedynamics.errors import DataError
from saedynamics.saes import load

from .conftest import cli_error, hub_config, hub_model, snapshot_of
from .synthetic import indexed_activation_file, make_sae, record_row_group_reads

MALFORMED = {
    # checkpoints
    "checkpoint file changed, hub": "fetched again from the HF cache, then verified",
    "checkpoint file missing, hub": "fetched again from the HF cache, then verified",
    "converted weights changed, hub (pickled source)": "converted again, byte-identical",
    "checkpoint and HF cache blob changed": "forced download, then verified",
    "checkpoint and HF cache blob changed, offline": "fails naming file and both digests",
    "checkpoint file changed, micro suite": "fails naming file and both digests",
    "checkpoint without manifest.json": "fails naming the directory",
    "checkpoint weights lack a layer's tensors": "fails naming the missing tensors",
    "checkpoint config.json shape != weights": "fails naming the tensors and shapes",
    "checkpoint d_model != config model.d_model": "fails naming both",
    # activation files
    "activation file cut in half": "fails at open",
    "activation file: bytes flipped in the middle": "fails at open naming the row group",
    "activation file: value bytes flipped in one row group": "the page CRC names the row group",
    "activation file: page header flipped": "names the row group, at open",
    "activation file without 'act' column": "fails at open",
    "activation file: vectors of another width than its d_model": "fails at open",
    "activation file: columns of other types": "fails at open",
    "activation file in format 1 (nullable lists)": "fails at open: rerun the rule",
    "activation file in format 2 (fixed_size_binary)": "fails at open: rerun the rule",
    "activation file of another step/layer": "fails naming both",
    "activation d_model != SAE d_in (measure)": "fails naming the files",
    "SAE d_in != model d_model (splice)": "fails naming the files",
    # SAEs
    "SAE safetensors missing a tensor": "fails naming the tensor",
    "SAE cfg.json d_in/d_sae != weights": "fails naming cfg.json and the shapes",
    "SAE cfg.json with an absurd d_sae": "fails before allocating",
    "SAE safetensors cut in half": "fails naming the file",
    "SAE cfg.json with invalid hyperparameters": "fails naming the key",
}
TRIED: set[str] = set()


def tried(case: str) -> None:
    assert case in MALFORMED, case
    TRIED.add(case)


def flip(path: Path, offset: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


# ---- checkpoints ---------------------------------------------------------------------------------


def digests(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def test_changed_and_missing_checkpoint_files_are_fetched_again(hub_copy, tmp_path, caplog):
    ckpt = tmp_path / "step0"
    manifest = download_checkpoint(hub_model(hub_copy), 0, ckpt, [])
    good = digests(ckpt)
    flip(ckpt / "model.safetensors", (ckpt / "model.safetensors").stat().st_size // 2)
    (ckpt / "config.json").unlink()
    (ckpt / ".snakemake_timestamp").touch()  # not in the manifest: ignored
    os.utime(ckpt, ns=(1_000_000_000, 2_000_000_000))
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(ckpt, cache_dir=str(hub_copy)) == manifest
    tried("checkpoint file changed, hub")
    tried("checkpoint file missing, hub")
    assert "model.safetensors: expected sha256" in caplog.text
    assert "config.json is missing" in caplog.text
    assert {n: d for n, d in digests(ckpt).items() if n in good} == good
    assert ckpt.stat().st_mtime_ns == 2_000_000_000  # repaired in place, Snakemake sees no change
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]
    assert load_model(ckpt).config.hidden_size == 32


def test_converted_weights_are_converted_again_identically(hub_copy, tmp_path):
    ckpt = tmp_path / "step2"  # step2 ships pickled weights only
    download_checkpoint(hub_model(hub_copy), 2, ckpt, [], provenance={"config_hash": "x"})
    good = sha256_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
    verify_checkpoint(ckpt, cache_dir=str(hub_copy))
    tried("converted weights changed, hub (pickled source)")
    assert sha256_file(ckpt / "model.safetensors") == good


def test_a_corrupt_cache_blob_is_downloaded_again(hub_copy, tmp_path, monkeypatch):
    """The cached copy is corrupt too: snapshot_download(force_download=True) is asked for, once
    (a stand-in for the Hub restores the blob, as a real download would)."""
    import huggingface_hub

    ckpt = tmp_path / "step0"
    download_checkpoint(hub_model(hub_copy), 0, ckpt, [])
    cached = snapshot_of(hub_copy, 0) / "model.safetensors"
    original = cached.read_bytes()
    flip(cached, len(original) // 2)
    flip(ckpt / "model.safetensors", len(original) // 2)
    real, calls = huggingface_hub.snapshot_download, []

    def snapshot_download(*args, **kwargs):
        calls.append(kwargs.get("force_download", False))
        if kwargs.get("force_download"):
            cached.write_bytes(original)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    verify_checkpoint(ckpt, cache_dir=str(hub_copy))
    tried("checkpoint and HF cache blob changed")
    assert calls == [False, True]
    assert ckpt.joinpath("model.safetensors").read_bytes() == original


@pytest.fixture()
def hub_study(hub_copy, tmp_path):
    """A hub study's config, token sample and checkpoint step0 (over the private cache copy)."""
    raw = hub_config(tmp_path, hub_copy)
    raw["model"]["cache_dir"] = str(hub_copy)
    cfg = load_config(raw)
    build_token_sample(
        cfg.corpus, cfg.tokens, cfg.model, tmp_path / "tokens", tmp_path / "tokenizer"
    )
    download_checkpoint(cfg.model, 0, tmp_path / "ckpt", [])
    return raw, tmp_path


def activations_cli(capsys, raw: dict, root: Path) -> str:
    settings = load_config(raw).stage_settings("activations")
    out = root / "acts"
    message = cli_error(
        capsys,
        "activations",
        "--settings",
        json.dumps(settings),
        "--checkpoint",
        root / "ckpt",
        "--tokens",
        root / "tokens",
        "--out",
        out,
    )
    assert not out.exists()  # nothing written by the stage that failed
    return message


def test_a_corrupt_cache_offline_fails_naming_the_file_and_digests(hub_study, capsys):
    raw, root = hub_study
    manifest = read_json(root / "ckpt/manifest.json")
    cached = snapshot_of(Path(raw["model"]["cache_dir"]), 0) / "model.safetensors"
    flip(cached, 1000)
    flip(root / "ckpt/model.safetensors", 1000)
    actual = sha256_file(root / "ckpt/model.safetensors")
    message = activations_cli(capsys, raw, root)
    tried("checkpoint and HF cache blob changed, offline")
    assert f"{root / 'ckpt'}: files differ from the sha256" in message
    assert f"model.safetensors: expected sha256 {manifest['files']['model.safetensors']}" in message
    assert f"found {actual}" in message and "Fetching them again failed" in message
    assert "differs from the digests recorded at the first download too" in message


def test_a_micro_checkpoint_cannot_be_fetched_again(hub_copy, tmp_path):
    ckpt = tmp_path / "step0"
    manifest = download_checkpoint(hub_model(hub_copy), 0, ckpt, [])
    write_json(ckpt / "manifest.json", {**manifest, "source": "micro"})
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(DataError) as error:
        verify_checkpoint(ckpt)
    tried("checkpoint file changed, micro suite")
    message = str(error.value)
    assert f"{ckpt}: files differ" in message and "micro_lm" in message
    assert f"config.json: expected sha256 {manifest['files']['config.json']}" in message
    assert f"found {sha256_file(ckpt / 'config.json')}" in message
    (ckpt / "manifest.json").unlink()
    with pytest.raises(DataError, match=f"{ckpt}: not a checkpoint directory .no manifest.json"):
        verify_checkpoint(ckpt)
    tried("checkpoint without manifest.json")


def rewrite_checkpoint(ckpt: Path, name: str, content: bytes) -> None:
    """Change a checkpoint file and record its new digest: a checkpoint malformed at the source."""
    (ckpt / name).write_bytes(content)
    manifest = read_json(ckpt / "manifest.json")
    manifest["files"][name] = sha256_file(ckpt / name)
    write_json(ckpt / "manifest.json", manifest)


def test_weights_without_a_layer_fail_before_any_compute(hub_study, capsys, tmp_path):
    raw, root = hub_study
    tensors = load_file(root / "ckpt/model.safetensors")
    kept = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    save_file(kept, tmp_path / "w.safetensors", metadata={"format": "pt"})
    rewrite_checkpoint(
        root / "ckpt", "model.safetensors", (tmp_path / "w.safetensors").read_bytes()
    )
    message = activations_cli(capsys, raw, root)
    tried("checkpoint weights lack a layer's tensors")
    assert f"{root / 'ckpt'}: its weights do not fit its config.json" in message
    assert f"{len(tensors) - len(kept)} tensors missing: gpt_neox.layers.1." in message


def test_config_shapes_that_do_not_fit_the_weights(hub_study, capsys):
    raw, root = hub_study
    config = read_json(root / "ckpt/config.json")
    rewrite_checkpoint(
        root / "ckpt", "config.json", json.dumps({**config, "intermediate_size": 128}).encode()
    )
    message = activations_cli(capsys, raw, root)
    tried("checkpoint config.json shape != weights")
    assert f"{root / 'ckpt'}: its weights do not fit its config.json" in message
    assert "mlp.dense_h_to_4h.weight [64, 32] (config.json implies [128, 32])" in message


def test_a_checkpoint_of_another_width_than_the_config(hub_study, capsys):
    raw, root = hub_study
    raw["model"]["d_model"] = 64
    message = activations_cli(capsys, raw, root)
    tried("checkpoint d_model != config model.d_model")
    assert f"{root / 'ckpt'}/config.json: the checkpoint has d_model 32 and 2 layers" in message
    assert "model.d_model is 64" in message


# ---- activation files ----------------------------------------------------------------------------


def test_the_reader_verifies_every_page_once_when_it_opens_a_file(tmp_path, monkeypatch):
    f = indexed_activation_file(tmp_path / "a.parquet")
    reads = record_row_group_reads(monkeypatch)
    assert ActivationFile(f.path).verified
    assert sorted(reads) == list(range(16))  # every row group, once
    reads.clear()
    unverified = ActivationFile(f.path, verify=False)
    assert not unverified.verified and reads == []
    unverified.verify()
    assert unverified.verified and sorted(reads) == list(range(16))


def good_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copy(indexed_activation_file(tmp_path / f"good-{name}").path, path)
    return path


def act_chunk(path: Path, row_group: int):
    """The 'act' column chunk of a row group (one data page: PLAIN values, no dictionary)."""
    chunk = pq.read_metadata(path).row_group(row_group).column(3)
    assert chunk.path_in_schema.startswith("act") and chunk.dictionary_page_offset is None
    return chunk


def test_malformed_activation_files_fail_at_open(tmp_path):
    truncated = good_file(tmp_path, "truncated.parquet")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: not a readable activation file"):
        ActivationFile(truncated)
    tried("activation file cut in half")

    middle = good_file(tmp_path, "middle.parquet")
    flip(middle, middle.stat().st_size // 2)
    with pytest.raises(DataError, match=rf"{middle}: row group [0-9]+ of 16 is corrupt"):
        ActivationFile(middle)
    tried("activation file: bytes flipped in the middle")

    values = good_file(tmp_path, "values.parquet")
    act = act_chunk(values, 5)
    flip(values, act.data_page_offset + act.total_compressed_size - 8, 2)  # plain float16 values
    # what a reader that skips the checksums gets: other numbers, silently
    unchecked, intact = (
        pq.read_table(p)["act"] for p in (values, tmp_path / "good-values.parquet")
    )
    assert len(unchecked) == len(intact) and not unchecked.equals(intact)
    with pytest.raises(DataError) as error:
        ActivationFile(values)
    assert str(error.value).startswith(f"{values}: row group 5 of 16 is corrupt (")
    assert "CRC" in str(error.value)
    assert str(error.value).endswith(
        "; delete the file and rerun the activations rule (snakemake --forcerun activations)"
    )
    unverified = ActivationFile(values, verify=False)  # the pages are checked on every read too
    assert unverified.read_row_groups([4, 6])["act"].shape == (128, 4)
    with pytest.raises(DataError, match=rf"{values}: row group 5 of 16 is corrupt"):
        unverified.read_row_groups([5])
    tried("activation file: value bytes flipped in one row group")

    header = good_file(tmp_path, "header.parquet")
    flip(header, act_chunk(header, 5).data_page_offset, 16)
    with pytest.raises(DataError, match=rf"{header}: row group 5 of 16 is corrupt"):
        ActivationFile(header)
    tried("activation file: page header flipped")


def test_no_byte_of_a_page_header_changes_the_values_read(tmp_path):
    """Every byte of a page header (which its CRC does not cover) and the first bytes of its data,
    flipped or replaced: a DataError naming the file and row group at open, or (a byte that does
    not matter) the values of the good file; never other values, never another error."""
    good = indexed_activation_file(tmp_path / "good.parquet")
    expected = good.read(good.columns)
    data = good.path.read_bytes()
    first = act_chunk(good.path, 5).data_page_offset
    bad, rng, outcomes = tmp_path / "bad.parquet", np.random.default_rng(0), []
    for offset in range(first, first + 40):
        for value in {data[offset] ^ 0xFF, data[offset] ^ 0x01, int(rng.integers(256))}:
            bad.write_bytes(data[:offset] + bytes([value]) + data[offset + 1 :])
            try:
                got = ActivationFile(bad).read(good.columns)
            except DataError as e:
                assert str(e).startswith(f"{bad}: row group 5 of 16 is corrupt"), e
                outcomes.append("error")
            else:
                assert all(np.array_equal(got[c], expected[c]) for c in expected), (offset, value)
                outcomes.append("same")
    assert outcomes.count("error") > 0.8 * len(outcomes)  # most bytes do matter
    # a page of a type that does not exist: pyarrow skips it, and the column read alone (as a
    # source reads act) comes back short of its rows; counted against the footer: an error too
    assert data[first : first + 2] == b"\x15\x00"  # PageHeader field 1 (type, i32): DATA_PAGE
    bad.write_bytes(data[: first + 1] + bytes([2 * 9]) + data[first + 2 :])  # zigzag: type 9
    with pytest.raises(DataError, match=rf"{bad}: row group 5 of 16 decodes short"):
        ActivationFile(bad, verify=False).read_row_groups([5], ("act",))


def rewritten(good: Path, path: Path, table: pa.Table, **metadata) -> Path:
    """`table` written with good's footer metadata, `metadata` changed in its saedynamics key."""
    footer = {k: v for k, v in pq.read_metadata(good).metadata.items() if k != b"ARROW:schema"}
    meta = json.loads(footer[METADATA_KEY]) | metadata
    footer[METADATA_KEY] = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata(footer), path, row_group_size=64)
    return path


def open_error(path: Path) -> str:
    """The message of the DataError that opening `path` raises: one line."""
    with pytest.raises(DataError) as error:
        ActivationFile(path)
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


def test_files_without_the_columns_of_an_activation_file_fail_at_open(tmp_path):
    good = indexed_activation_file(tmp_path / "good.parquet").path
    table = pq.read_table(good)
    # the good table rewritten as it is: opens (the cases below fail for what they change)
    assert ActivationFile(rewritten(good, tmp_path / "same.parquet", table)).verified
    rerun = "not those an activation file has; rerun the activations rule"

    no_act = rewritten(good, tmp_path / "no-act.parquet", table.drop_columns(["act"]))
    message = open_error(no_act)
    assert message.startswith(f"{no_act}: its columns are doc_id: int32 not null, pos: ")
    assert "act:" not in message and rerun in message
    tried("activation file without 'act' column")

    values = pa.array(np.zeros(table.num_rows * 3, np.float16))
    narrow = pa.FixedSizeListArray.from_arrays(values, type=schema(3).field("act").type)
    wrong_width = tmp_path / "wrong-width.parquet"  # metadata: d_model 4; the column: 3 values
    rewritten(good, wrong_width, table.set_column(3, schema(3).field("act"), narrow))
    message = open_error(wrong_width)
    assert "act: fixed_size_list<element: halffloat not null>[3] not null" in message
    assert "(metadata d_model 4)" in message and rerun in message
    for d_model in (8, None, "4"):  # the file's own columns, its metadata saying otherwise
        path = rewritten(good, tmp_path / f"d-model-{d_model}.parquet", table, d_model=d_model)
        assert f"(metadata d_model {d_model!r}), {rerun}" in open_error(path)
    tried("activation file: vectors of another width than its d_model")

    as_float32 = tmp_path / "float32.parquet"
    act32 = table.column("act").cast(pa.list_(pa.field("element", pa.float32(), False), 4))
    rewritten(good, as_float32, table.set_column(3, pa.field("act", act32.type, False), act32))
    nullable = tmp_path / "nullable.parquet"
    rewritten(good, nullable, table.set_column(3, "act", table.column("act")))
    doc64 = tmp_path / "doc-int64.parquet"
    rewritten(good, doc64, table.set_column(0, "doc_id", table.column("doc_id").cast(pa.int64())))
    extra = tmp_path / "extra.parquet"
    rewritten(good, extra, table.append_column("notes", pa.array(["x"] * table.num_rows)))
    for path in (as_float32, nullable, doc64, extra):
        assert open_error(path).startswith(f"{path}: its columns are ")
        assert rerun in open_error(path)
    tried("activation file: columns of other types")


@pytest.mark.parametrize(
    ("version", "act_type"),
    [
        (1, pa.list_(pa.float16(), 4)),  # nullable lists
        (2, pa.binary(8)),  # each row's float16 values as bytes
    ],
)
def test_an_activation_file_of_an_older_format_asks_for_the_rule_to_rerun(
    tmp_path, version, act_type
):
    values = np.arange(64 * 4, dtype=np.float16)
    if version == 1:
        act = pa.FixedSizeListArray.from_arrays(pa.array(values), type=act_type)
    else:
        act = pa.array([values[i * 4 : i * 4 + 4].tobytes() for i in range(64)], act_type)
    idx = pa.array(np.arange(64, dtype=np.int32))
    meta = {"format_version": version, "step": 0, "layer": 0, "d_model": 4, "dtype": "float16"}
    old = tmp_path / "old.parquet"
    table = pa.table({"doc_id": idx, "pos": idx, "token_id": idx, "act": act})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), old)
    with pytest.raises(DataError) as error:
        ActivationFile(old)
    assert str(error.value) == (
        f"{old}: written in activation format {version}, this saedynamics reads format 3 (vectors "
        "as lists of numbers); rerun the activations rule (snakemake --forcerun activations)"
    )
    tried(
        "activation file in format 1 (nullable lists)"
        if version == 1
        else "activation file in format 2 (fixed_size_binary)"
    )


# ---- SAEs, and the train / measure / splice stages -----------------------------------------------


def save_sae(directory: Path, d_in=4, d_sae=16, seed=0) -> Path:
    make_sae("topk", d_in=d_in, d_sae=d_sae, seed=seed, k=2).save(directory, {}, {"seed": seed})
    return directory


def test_malformed_sae_directories(tmp_path):
    good = save_sae(tmp_path / "good")
    tensors = load_file(good / "sae_weights.safetensors")
    cfg = read_json(good / "cfg.json")

    def variant(name, weights=None, **cfg_changes) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        if weights is not None:
            save_file(weights, d / "sae_weights.safetensors")
        write_json(d / "cfg.json", {**cfg, **cfg_changes})
        return d

    d = variant("missing", {k: v for k, v in tensors.items() if k != "b_enc"})
    with pytest.raises(DataError) as error:
        load(d)
    tried("SAE safetensors missing a tensor")
    assert str(error.value).startswith(f"{d}/sae_weights.safetensors: tensors do not match")
    assert "missing tensors ['b_enc']" in str(error.value)

    d = variant("d-in", d_in=8)
    with pytest.raises(DataError) as error:
        load(d)
    tried("SAE cfg.json d_in/d_sae != weights")
    assert f"{d}/sae_weights.safetensors: tensors do not match cfg.json" in str(error.value)
    assert "d_in 8 and d_sae 16 imply W_enc [8, 16], W_dec [16, 8]" in str(error.value)
    assert "the file holds W_enc [4, 16], W_dec [16, 4]" in str(error.value)

    d = variant("huge", d_sae=10**12)  # a SAE of that size is never built
    with pytest.raises(DataError, match="d_sae 1000000000000 imply W_enc"):
        load(d)
    tried("SAE cfg.json with an absurd d_sae")

    d = variant("truncated")
    weights = d / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(DataError, match=f"{weights}: not a readable safetensors file"):
        load(d)
    tried("SAE safetensors cut in half")

    d = variant("hyper", saedynamics={**cfg["saedynamics"], "hyperparameters": {"k": "many"}})
    with pytest.raises(DataError, match=rf"{d}/cfg.json: saedynamics.hyperparameters .*'topk'"):
        load(d)
    tried("SAE cfg.json with invalid hyperparameters")


def train_settings() -> str:
    return json.dumps(
        {
            "study": "t",
            "training": {
                "n_latents": 16,
                "seeds": [0, 1],
                "train_tokens": 512,
                "batch_size": 128,
                "init_tokens": 128,
            },
            "architectures": {"topk": {"architecture": "topk", "k": 2}},
        }
    )


def count_verifications(monkeypatch) -> list[int]:
    calls = []
    original = ActivationFile.verify
    monkeypatch.setattr(ActivationFile, "verify", lambda self: calls.append(1) or original(self))
    return calls


def test_train_verifies_once_and_refuses_another_layers_file(tmp_path, capsys, monkeypatch):
    acts = indexed_activation_file(tmp_path / "train.parquet").path  # step 0, layer 0
    calls = count_verifications(monkeypatch)
    args = ["--step", 0, "--activations", acts, "--settings", train_settings()]
    out = tmp_path / "saes/step0/layer1"
    message = cli_error(capsys, "train", *args, "--layer", 1, "--out", out)
    tried("activation file of another step/layer")
    assert message == (
        f"error: {acts}: holds the activations of step 0, layer 0 (its metadata), not of step 0, "
        "layer 1 as this job was asked; rerun the activations rule"
    )
    assert not (tmp_path / "saes").exists()
    calls.clear()
    out = tmp_path / "saes/step0/layer0"
    assert main(["train", *map(str, args), "--layer", "0", "--out", str(out)]) == 0
    assert calls == [1]  # verified once per job
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/cfg.json")) == [
        "topk/seed0/cfg.json",
        "topk/seed1/cfg.json",
    ]


def test_measure_refuses_saes_of_another_width(tmp_path, capsys, monkeypatch):
    acts = indexed_activation_file(tmp_path / "eval.parquet").path  # d_model 4
    saes = tmp_path / "saes/step0/layer0"
    save_sae(saes / "topk/seed0", d_in=4)
    save_sae(saes / "topk/seed1", d_in=4, seed=1)
    save_sae(saes / "wide/seed0", d_in=8)
    save_sae(saes / "wide/seed1", d_in=4, seed=1)
    calls = count_verifications(monkeypatch)
    out = tmp_path / "metrics/step0/layer0"
    args = ["--step", 0, "--layer", 0, "--activations", acts, "--saes", saes, "--out", out]
    args += ["--settings", json.dumps({"study": "t", "metrics": {"batch_size": 256}})]
    message = cli_error(capsys, "measure", *args, "--architectures", "topk", "wide")
    tried("activation d_model != SAE d_in (measure)")
    assert f"{acts} has d_model 4, but the SAEs in {saes / 'wide/seed0'} have d_in 8" in message
    assert not (tmp_path / "metrics").exists()  # every SAE checked before any is measured
    calls.clear()
    assert main(["measure", *map(str, args), "--architectures", "topk"]) == 0
    assert calls == [1]  # verified once per job
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == [
        "topk/consistency.json",
        "topk/reconstruction.json",
        "topk/superposition.json",
    ]
    measured = read_json(out / "topk/reconstruction.json")
    assert [s["seed"] for s in measured["seeds"]] == [0, 1] and measured["architecture"] == "topk"


def test_splice_refuses_saes_of_another_width(hub_study, capsys):
    raw, root = hub_study
    saes = save_sae(root / "saes/topk/seed0", d_in=8).parent
    out = root / "spliced.json"
    settings = load_config(raw).stage_settings("splice")
    message = cli_error(
        capsys,
        "splice",
        "--settings",
        json.dumps(settings),
        "--step",
        0,
        "--layer",
        0,
        "--checkpoint",
        root / "ckpt",
        "--tokens",
        root / "tokens",
        "--saes",
        saes,
        "--out",
        out,
    )
    tried("SAE d_in != model d_model (splice)")
    assert f"{root / 'ckpt'} (config.json) has d_model 32" in message
    assert f"{saes / 'seed0'} have d_in 8" in message
    assert not out.exists()


def test_every_malformed_case_is_tried(request):
    """Last in this module (pytest keeps file order): when every test of the module was selected,
    every case of MALFORMED was tried."""
    here = [item for item in request.session.items if item.module is request.module]
    tests = [name for name in globals() if name.startswith("test_")]
    if {item.originalname for item in here} == set(tests):
        assert set(MALFORMED) == TRIED, f"not tried: {sorted(set(MALFORMED) - TRIED)}"
    print(f"{len(TRIED)} of {len(MALFORMED)} malformed-file cases tried")
