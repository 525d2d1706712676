"""Integrity: checkpoints against their manifest's sha256, activation files against their checksum,
and malformed inputs (truncated or flipped Parquet, missing tensors, layers or columns, shapes that
do not match) failing before any compute, with one message naming the file and what is wrong, and
leaving nothing at the output path of the stage that failed.

The cases are listed in MALFORMED; `test_every_malformed_case_is_tried` checks that each is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from saedynamics.activations import CHECKSUM_KEY, METADATA_KEY, ActivationFile
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
from .synthetic import indexed_activation_file, make_sae

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
    "activation file: bytes flipped in the middle": "fails at open",
    "activation file: value bytes flipped in one row group": "checksum names the row group",
    "activation file: page header flipped": "names the unreadable row group, at open",
    "activation file: row groups differ from the checksum's": "fails naming both",
    "activation file: malformed checksum metadata": "fails at open",
    "activation file without 'act' column": "fails at open",
    "activation file in format 1 (act as fixed_size_list)": "fails at open: rerun the rule",
    "activation file: vector layout != its metadata": "fails at open naming the column",
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
        cfg.corpus, cfg.tokens, cfg.model, tmp_path / "tokens.parquet", tmp_path / "tokenizer"
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
        root / "tokens.parquet",
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


def test_every_writer_records_a_checksum_and_the_reader_verifies_it(tmp_path, monkeypatch):
    calls = []
    original = ActivationFile.verify
    monkeypatch.setattr(ActivationFile, "verify", lambda self: calls.append(1) or original(self))
    f = indexed_activation_file(tmp_path / "a.parquet")
    checksum = json.loads(pq.read_metadata(f.path).metadata[CHECKSUM_KEY])
    assert checksum["algorithm"] == "sha256" and len(checksum["row_groups"]) == 16
    assert [rows for rows, _ in checksum["row_groups"]] == [64] * 15 + [40]
    assert calls == [1] and f.verified
    # the definition (module docstring), recomputed independently from the file's own columns
    table = pq.ParquetFile(f.path).read_row_group(3)
    digest = hashlib.sha256()
    for name in table.column_names:
        values = table.column(name).combine_chunks()
        if isinstance(values.type, pa.FixedSizeBinaryType):  # a vector: its rows' values
            data = values.buffers()[1].to_pybytes()[: len(values) * values.type.byte_width]
        else:
            data = values.to_numpy().tobytes()
        digest.update(name.encode() + b"\0" + data)
    assert checksum["row_groups"][3][1] == digest.hexdigest()
    assert not ActivationFile(f.path, verify=False).verified and calls == [1]


def test_a_file_without_a_checksum_is_read_with_a_warning(tmp_path, caplog):
    f = indexed_activation_file(tmp_path / "a.parquet")
    table = pq.read_table(f.path)
    footer = {k: v for k, v in pq.read_metadata(f.path).metadata.items() if k != CHECKSUM_KEY}
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(table.replace_schema_metadata(footer), legacy, row_group_size=64)
    with caplog.at_level(logging.WARNING):
        old = ActivationFile(legacy)
    assert f"{legacy}: written before activation files carried a checksum" in caplog.text
    assert not old.verified
    assert torch.equal(torch.cat(list(old.tensors(100))), torch.cat(list(f.tensors(100))))


def good_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copy(indexed_activation_file(tmp_path / f"good-{name}").path, path)
    return path


def test_malformed_activation_files_fail_at_open(tmp_path):
    truncated = good_file(tmp_path, "truncated.parquet")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: not a readable activation file"):
        ActivationFile(truncated)
    tried("activation file cut in half")

    middle = good_file(tmp_path, "middle.parquet")
    flip(middle, middle.stat().st_size // 2)
    with pytest.raises(DataError, match=f"{middle}: row group [0-9]+ .*corrupt"):
        ActivationFile(middle)
    tried("activation file: bytes flipped in the middle")

    values = good_file(tmp_path, "values.parquet")
    act = pq.read_metadata(values).row_group(5).column(3)  # the 'act' column chunk
    assert act.path_in_schema.startswith("act")
    flip(values, act.data_page_offset + act.total_compressed_size - 8, 2)  # plain float16 values
    assert ActivationFile(values, verify=False).read_row_group(5)["act"].shape == (64, 4)  # decodes
    with pytest.raises(
        DataError,
        match=rf"{values}: row group 5 of 16 \(rows 320 to 383\) does not match the checksum",
    ):
        ActivationFile(values)
    tried("activation file: value bytes flipped in one row group")

    header = good_file(tmp_path, "header.parquet")
    flip(header, act.data_page_offset, 16)
    with pytest.raises(DataError, match=f"{header}: row group 5 is unreadable"):
        ActivationFile(header)
    tried("activation file: page header flipped")


def test_inconsistent_checksums_and_schemas_fail_at_open(tmp_path):
    good = indexed_activation_file(tmp_path / "good.parquet").path
    footer = pq.read_metadata(good).metadata
    table = pq.read_table(good).replace_schema_metadata(footer)
    regrouped = tmp_path / "regrouped.parquet"
    pq.write_table(table, regrouped, row_group_size=100)  # same rows and footer, other row groups
    with pytest.raises(DataError, match=f"{regrouped}: has 10 row groups .* records 16"):
        ActivationFile(regrouped)
    tried("activation file: row groups differ from the checksum's")

    bad_checksum = tmp_path / "bad-checksum.parquet"
    bad = {**footer, CHECKSUM_KEY: b'{"algorithm": "md5"}'}
    pq.write_table(table.replace_schema_metadata(bad), bad_checksum, row_group_size=64)
    with pytest.raises(DataError, match=f"{bad_checksum}: its checksum metadata is malformed"):
        ActivationFile(bad_checksum)
    tried("activation file: malformed checksum metadata")

    no_act = tmp_path / "no-act.parquet"
    pq.write_table(table.drop_columns(["act"]), no_act)
    with pytest.raises(DataError, match=f"{no_act}: column 'act' must be"):
        ActivationFile(no_act)
    tried("activation file without 'act' column")

    wrong_width = tmp_path / "wrong-width.parquet"  # metadata: d_model 4; the column: 3 values
    narrow = pa.array([b"\0" * 6] * table.num_rows, pa.binary(6))
    pq.write_table(table.set_column(3, pa.field("act", pa.binary(6), False), narrow), wrong_width)
    with pytest.raises(
        DataError, match=rf"{wrong_width}: column 'act' must be fixed_size_binary\(8\)"
    ):
        ActivationFile(wrong_width)
    meta = json.loads(footer[METADATA_KEY])
    mislabelled = tmp_path / "mislabelled.parquet"
    bad = {**footer, METADATA_KEY: json.dumps({**meta, "vectors": {"act": "float32"}})}
    pq.write_table(table.replace_schema_metadata(bad), mislabelled)
    with pytest.raises(DataError, match=f"{mislabelled}: column 'act' must be .* float16"):
        ActivationFile(mislabelled)
    tried("activation file: vector layout != its metadata")


def test_an_activation_file_of_format_1_asks_for_the_rule_to_rerun(tmp_path):
    """Format 1 stored act as fixed_size_list<float16>[d_model] (decoded ~20x slower)."""
    values = pa.array(np.arange(64 * 4, dtype=np.float16))
    act = pa.FixedSizeListArray.from_arrays(values, type=pa.list_(pa.float16(), 4))
    idx = pa.array(np.arange(64, dtype=np.int32))
    meta = {"format_version": 1, "step": 0, "layer": 0, "dtype": "float16"}
    old = tmp_path / "old.parquet"
    table = pa.table({"doc_id": idx, "pos": idx, "token_id": idx, "act": act})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), old)
    with pytest.raises(DataError, match=f"{old}: written in activation format 1") as error:
        ActivationFile(old)
    assert "rerun the activations rule (snakemake --forcerun activations)" in str(error.value)
    tried("activation file in format 1 (act as fixed_size_list)")


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
            "architecture_name": "topk",
            "architecture": {"architecture": "topk", "k": 2},
        }
    )


def test_train_verifies_once_and_refuses_another_layers_file(tmp_path, capsys, monkeypatch):
    acts = indexed_activation_file(tmp_path / "train.parquet").path  # step 0, layer 0
    calls = []
    original = ActivationFile.verify
    monkeypatch.setattr(ActivationFile, "verify", lambda self: calls.append(1) or original(self))
    ident = ["--step", 0, "--architecture", "topk", "--activations", acts, "--settings"]
    out = tmp_path / "saes"
    message = cli_error(capsys, "train", "--layer", 1, *ident, train_settings(), "--out", out)
    tried("activation file of another step/layer")
    assert message == (
        f"error: {acts}: holds the activations of step 0, layer 0 (its metadata), not of step 0, "
        "layer 1 as this job was asked; rerun the activations rule"
    )
    assert not out.exists()
    calls.clear()
    argv = ["train", "--layer", "0", *map(str, ident), train_settings(), "--out", str(out)]
    assert main(argv) == 0
    assert calls == [1] and (out / "seed1/cfg.json").exists()  # verified once per job


def test_measure_refuses_saes_of_another_width(tmp_path, capsys, monkeypatch):
    acts = indexed_activation_file(tmp_path / "eval.parquet").path  # d_model 4
    saes = tmp_path / "saes"
    save_sae(saes / "seed0", d_in=4)
    save_sae(saes / "seed1", d_in=4, seed=1)
    save_sae(saes / "seed2", d_in=8, seed=2)
    calls = []
    original = ActivationFile.verify
    monkeypatch.setattr(ActivationFile, "verify", lambda self: calls.append(1) or original(self))
    out = tmp_path / "metrics"
    argv = ["--step", 0, "--layer", 0, "--architecture", "topk", "--activations", acts]
    settings = json.dumps({"study": "t", "metrics": {"batch_size": 256}})
    message = cli_error(
        capsys, "measure", *argv, "--saes", saes, "--settings", settings, "--out", out
    )
    tried("activation d_model != SAE d_in (measure)")
    assert f"{acts} has d_model 4, but the SAEs in {saes / 'seed2'} have d_in 8" in message
    assert not out.exists()
    shutil.rmtree(saes / "seed2")
    calls.clear()
    args = [*map(str, argv), "--saes", str(saes), "--settings", settings, "--out", str(out)]
    assert main(["measure", *args]) == 0
    assert calls == [1] and (out / "consistency.json").exists()  # verified once per job


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
        root / "tokens.parquet",
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
