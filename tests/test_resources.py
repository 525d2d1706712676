"""Resources: the disk space the activation cache needs, checked before the model loads; a disk that
fills up while it writes (a real small tmpfs); a GPU out of memory in training and in caching.

Each failure is one message naming what to change, and leaves no output and no temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import saedynamics.caching as caching
import saedynamics.checkpoints as checkpoints
from saedynamics.activations import ActivationFile, ActivationWriter, read_metadata
from saedynamics.artifacts import provenance
from saedynamics.cli import main
from saedynamics.config import load_config
from saedynamics.errors import ResourceError
from saedynamics.resources import estimate_activation_bytes, human_bytes
from saedynamics.saes import REGISTRY

from .conftest import REPO, cli_error
from .synthetic import sparse_dataset

# the hub study of conftest.hub_config: 2 layers, d_model 32, 64 train and 16 eval windows of 16
LAYERS, D_MODEL, ROW_GROUP_ROWS = (0, 1), 32, 256
WINDOWS, CONTEXT = {"train": 64, "eval": 16}, 16
OUT_OF_MEMORY = (  # a CUDA allocator's message, as torch words it
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of "
    "which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in "
    "use. Of the allocated memory 75.2 GiB is allocated by PyTorch, and 2.1 GiB is reserved by "
    "PyTorch but unallocated."
)


def activations_argv(raw: dict, root: Path, out: Path) -> list[str]:
    settings = load_config(raw).stage_settings("activations")
    return [
        "activations",
        "--settings",
        json.dumps(settings),
        "--checkpoint",
        str(root / "ckpt"),
        "--tokens",
        str(root / "tokens"),
        "--out",
        str(out),
    ]


def stage_estimate(positions: int = CONTEXT - 1) -> int:
    """What the activations stage of the hub study should estimate for all its files."""
    return len(LAYERS) * sum(
        estimate_activation_bytes(n * positions, D_MODEL, (), ROW_GROUP_ROWS)
        for n in WINDOWS.values()
    )


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# ---- the estimate ------------------------------------------------------------------------------------


def write_like_the_cache(path: Path, n: int, d: int, extras=(), row_group_rows=2048) -> int:
    """An activation file of n rows as the cache writes them (windows of 128 tokens less the first,
    token ids from a 50k vocabulary, provenance in the footer); its size in bytes."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    writer = ActivationWriter(
        path,
        d,
        {"model": "EleutherAI/pythia-70m-deduped", "revision": "step1000", "step": 1000},
        row_group_rows,
        extras,
        provenance=provenance({"study": "estimate"}),
    )
    batch = 32 * 127
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        columns = {}
        if "lm_entropy" in extras:
            columns["lm_entropy"] = torch.rand(len(rows), generator=g) * 8
        if "lm_grad" in extras:
            columns["lm_grad"] = torch.randn(len(rows), d, generator=g) * 1e-3
        writer.append(
            (rows // 127).astype(np.int32),
            (rows % 127 + 1).astype(np.int32),
            rng.integers(0, 50_000, len(rows)).astype(np.int32),
            torch.randn(len(rows), d, generator=g) * 3,
            **columns,
        )
    writer.close()
    return path.stat().st_size


@pytest.mark.parametrize(
    ("n", "d", "extras", "row_group_rows", "at_most"),
    [
        (16_384, 64, (), 2048, 1.3),
        (16_384, 64, ("lm_entropy", "lm_grad"), 2048, 1.3),
        (16_384, 256, ("lm_entropy",), 4096, 1.3),
        (300, 8, ("lm_entropy",), 64, None),  # a tiny file: the fixed part dominates, only >=
    ],
)
def test_the_estimate_bounds_the_written_file(tmp_path, n, d, extras, row_group_rows, at_most):
    actual = write_like_the_cache(tmp_path / "a.parquet", n, d, extras, row_group_rows)
    estimate = estimate_activation_bytes(n, d, extras, row_group_rows)
    print(f"estimate / actual = {estimate / actual:.3f} ({estimate} / {actual} bytes)")
    assert estimate >= actual
    if at_most is not None:
        assert estimate <= at_most * actual


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"


# ---- the check before caching ----------------------------------------------------------------------


def fake_free_space(monkeypatch, free: int) -> None:
    real = shutil.disk_usage

    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def test_caching_refuses_before_loading_the_model_when_the_disk_is_too_small(
    hub_stage, capsys, monkeypatch
):
    raw, root = hub_stage
    out = root / "acts"
    need = stage_estimate()
    loaded = []  # cache_activations imports load_model when called: patched where it lives
    original_load = checkpoints.load_model
    monkeypatch.setattr(
        checkpoints, "load_model", lambda *a, **k: loaded.append(1) or original_load(*a, **k)
    )
    fake_free_space(monkeypatch, need // 2)
    message = cli_error(capsys, *activations_argv(raw, root, out))
    assert message == (
        f"error: {out}/layer<L>/{{train,eval}}.parquet for layers [0, 1] (train 960 and eval 240 "
        f"tokens per layer, d_model 32) need about {human_bytes(need)} (an estimate), but "
        f"{human_bytes(need // 2)} is free on the disk of {out}; free space on that disk, or lower "
        "tokens.train_sequences or cache fewer activations.layers. Nothing was written."
    )
    assert not loaded and not out.exists()
    # every position kept: the estimate counts 16 per window, not 15; one byte short is refused
    raw["activations"]["drop_first_position"] = False
    fake_free_space(monkeypatch, stage_estimate(CONTEXT) - 1)
    message = cli_error(capsys, *activations_argv(raw, root, out))
    assert "(train 1024 and eval 256 tokens per layer" in message
    assert f"need about {human_bytes(stage_estimate(CONTEXT))}" in message
    assert not loaded and not out.exists()
    # exactly enough: cached, and the files are no larger than estimated
    raw["activations"]["drop_first_position"] = True
    fake_free_space(monkeypatch, need)
    assert main(activations_argv(raw, root, out)) == 0
    assert loaded
    written = [out / f"layer{layer}/{split}.parquet" for layer in LAYERS for split in WINDOWS]
    assert files_under(out) == sorted(str(p.relative_to(out)) for p in written)
    assert sum(p.stat().st_size for p in written) <= need


# ---- a disk that fills up while caching ---------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/small (needs root, as CI runs); unmounted after the test."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:  # lazily: a memory map still open would make a plain umount fail
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_disk_that_fills_up_while_caching_fails_cleanly_and_the_rerun_succeeds(
    hub_stage, small_disk, capsys, monkeypatch
):
    raw, root = hub_stage
    out, ballast = small_disk / "acts", small_disk / "ballast"
    reference = root / "reference"
    assert main(activations_argv(raw, root, reference)) == 0
    train_file = estimate_activation_bytes(WINDOWS["train"] * 15, D_MODEL, (), ROW_GROUP_ROWS)

    # another job fills the disk right after the check, leaving half of what one train file takes
    checked = caching.require_free_space

    def check_then_fill(folder, need, what, advice):
        checked(folder, need, what, advice)  # 4 MiB free: passes
        ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - train_file // 2))

    monkeypatch.setattr(caching, "require_free_space", check_then_fill)
    failed_on = []  # the files the disk filled up on
    write = ActivationWriter._write

    def recording_write(self, whole_row_groups):
        try:
            write(self, whole_row_groups)
        except ResourceError:
            failed_on.append(self.path)
            raise

    monkeypatch.setattr(ActivationWriter, "_write", recording_write)
    message = cli_error(capsys, *activations_argv(raw, root, out))
    assert ballast.exists()
    assert len(failed_on) == 1 and failed_on[0].name == "train.parquet"
    assert message.startswith(f"error: {failed_on[0]}: No space left on device while writing it")
    assert f"take about {human_bytes(stage_estimate())} in all" in message
    assert list(small_disk.iterdir()) == [ballast]  # no output, no temporary file, no folder

    # the check itself, on the full disk: refused before the model loads
    monkeypatch.setattr(caching, "require_free_space", checked)
    message = cli_error(capsys, *activations_argv(raw, root, out))
    assert f"need about {human_bytes(stage_estimate())} (an estimate), but " in message
    assert f"is free on the disk of {out}" in message
    assert list(small_disk.iterdir()) == [ballast]

    # space back: the rule's command, in a process of its own, succeeds
    ballast.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    threads = ["--threads", str(torch.get_num_threads())]  # the reference's: the same sums
    rerun = subprocess.run(
        [sys.executable, "-m", "saedynamics", *activations_argv(raw, root, out), *threads],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert rerun.returncode == 0, rerun.stderr
    for layer in LAYERS:
        for split in WINDOWS:
            name = f"layer{layer}/{split}.parquet"
            assert ActivationFile(out / name).verified  # every page against its CRC
            assert pq.read_table(out / name).equals(pq.read_table(reference / name))
            assert read_metadata(out / name) == read_metadata(reference / name)


# ---- GPU out of memory ----------------------------------------------------------------------------


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(OUT_OF_MEMORY)


def train_argv(tmp_path: Path, architectures: dict) -> list:
    acts = tmp_path / "train.parquet"
    if not acts.exists():
        sparse_dataset(acts, n=4096)
    settings = {
        "study": "t",
        "training": {
            "n_latents": 64,
            "seeds": [0, 1],
            "train_tokens": 4096,
            "batch_size": 256,
            "init_tokens": 512,
        },
        "architectures": architectures,
    }
    argv = ["train", "--settings", json.dumps(settings), "--step", 0, "--layer", 0]
    return [*argv, "--activations", acts, "--out", tmp_path / "saes/step0/layer0"]


@pytest.mark.parametrize("where", ["init_from_sample", "loss"])
def test_out_of_memory_in_training_names_the_batch_size(tmp_path, capsys, monkeypatch, where):
    original = getattr(REGISTRY["topk"], where)
    if where == "loss":  # a few steps train, then a batch does not fit

        def fail(self, x, step, extras=None):
            return out_of_memory() if step.index == 3 else original(self, x, step, extras)

    monkeypatch.setattr(REGISTRY["topk"], where, fail if where == "loss" else out_of_memory)
    message = cli_error(capsys, *train_argv(tmp_path, {"topk": {"architecture": "topk", "k": 4}}))
    assert message == (
        "error: topk (step 0, layer 0): out of GPU memory (CUDA out of memory. Tried to allocate "
        "2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.06 GiB is free); 1 "
        "architectures x 2 seeds x 64 latents trained together on batches of training.batch_size "
        "256: lower training.batch_size, or training.n_latents, or train fewer training.seeds. No "
        "SAE was written"
    )
    assert files_under(tmp_path) == ["train.parquet"]  # no SAE, no temporary directory


def test_out_of_memory_in_a_set_names_the_split_by_architecture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(REGISTRY["topk"], "init_from_sample", out_of_memory)
    architectures = {
        "relu": {"architecture": "relu"},
        "topk": {"architecture": "topk", "k": 4},
        "topk16": {"architecture": "topk", "k": 16},
    }
    message = cli_error(capsys, *train_argv(tmp_path, architectures))
    assert message.startswith("error: relu, topk, topk16 (step 0, layer 0): out of GPU memory (")
    assert message.endswith(
        "; 3 architectures x 2 seeds x 64 latents trained together on batches of "
        "training.batch_size 256: lower training.batch_size, or training.n_latents, or train "
        "fewer training.seeds, or set training.split_by_architecture: true. No SAE was written"
    )
    assert files_under(tmp_path) == ["train.parquet"]


def test_out_of_memory_in_caching_names_batch_sequences(hub_stage, capsys, monkeypatch):
    from transformers import GPTNeoXForCausalLM

    raw, root = hub_stage
    calls, original = [], GPTNeoXForCausalLM.forward

    def forward(self, *args, **kwargs):  # the train split fits (2 batches), the eval one not
        calls.append(1)
        return out_of_memory() if len(calls) == 3 else original(self, *args, **kwargs)

    monkeypatch.setattr(GPTNeoXForCausalLM, "forward", forward)
    out = root / "acts"
    message = cli_error(capsys, *activations_argv(raw, root, out))
    assert len(calls) == 3
    assert message.startswith(
        f"error: {root / 'ckpt'}: caching activations in batches of activations.batch_sequences "
        "32: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB."
    )
    assert message.endswith("; lower activations.batch_sequences. Nothing was written")
    assert not out.exists()  # the train files already written are removed too: all or none


def test_a_full_disk_in_any_stage_is_one_message(tmp_path, monkeypatch, capsys):
    """Stages other than caching write through atomic temporaries too: a full disk there (here
    the tables stage's writer) ends in one line naming the file, not an OSError traceback."""
    import errno

    import saedynamics.tables

    target = tmp_path / "tables" / "reconstruction.parquet"
    argv = ["tables", "--settings", '{"study": "t"}', "--out", tmp_path / "tables"]
    argv += ["--inputs", tmp_path]

    def failing(error: OSError):
        def collect(*args, **kwargs):
            raise error

        return collect

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    monkeypatch.setattr(saedynamics.tables, "collect", failing(full))
    assert cli_error(capsys, *argv) == (
        f"error: {target}: No space left on device while writing it; nothing half-written was "
        "kept. Free space on that disk and rerun."
    )
    # any other OSError is not ours to word: it propagates as is
    monkeypatch.setattr(saedynamics.tables, "collect", failing(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        main([str(a) for a in argv])
