"""Activation files (activations.py) and the sources the trainer reads them through (sources.py).

The order a source deals its batches in is part of reproducibility: it is checked here against a
reference written from the algorithm that sources.py documents, for files and tensors, resident
and read a buffer at a time, from the start and from any batch on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from saedynamics.activations import (
    FORMAT_VERSION,
    ActivationFile,
    ActivationWriter,
    read_metadata,
)
from saedynamics.errors import DataError, ResourceError
from saedynamics.sources import FileSource, TensorSource

from .synthetic import indexed_activation_file as indexed_file
from .synthetic import record_row_group_reads

N, D, ROW_GROUP = 1000, 4, 64  # indexed_file's default: 16 row groups, 15 of 64 rows and one of 40


# ---- the reference order ------------------------------------------------------------------------


def reference_order(block_rows, seed, buffer_rows, n_rows):
    """The first n_rows row ids a source of blocks `block_rows` deals out, and its buffers as
    (first, end) positions in that sequence with their blocks; rows numbered in block order."""
    starts = np.concatenate([[0], np.cumsum(block_rows)])
    rows, buffers, epoch = [], [], 0
    while len(rows) < n_rows:
        order = list(np.random.default_rng([seed, epoch]).permutation(len(block_rows)))
        groups = []
        while order:  # greedily: blocks while they fit buffer_rows, one at least
            group = [order.pop(0)]
            size = block_rows[group[0]]
            while order and size + block_rows[order[0]] <= buffer_rows:
                size += block_rows[order[0]]
                group.append(order.pop(0))
            groups.append(group)
        for k, group in enumerate(groups):
            ids = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in group])
            shuffled = ids[np.random.default_rng([seed, epoch, k]).permutation(len(ids))]
            buffers.append((len(rows), len(rows) + len(ids), [int(b) for b in group]))
            rows.extend(shuffled.tolist())
        epoch += 1
    return np.array(rows[:n_rows]), buffers


def reference_batches(block_rows, seed, buffer_rows, batch_size, n_batches) -> np.ndarray:
    rows, _ = reference_order(block_rows, seed, buffer_rows, batch_size * n_batches)
    return rows.reshape(n_batches, batch_size)


def row_ids(stream, n: int, column="act") -> np.ndarray:
    """The row ids (first coordinate) of the next n batches."""
    out = []
    for _ in range(n):
        values = next(stream)[column]
        out.append((values[:, 0] if values.ndim == 2 else values).numpy().astype(int))
    stream.close()
    return np.stack(out)


def tensor_source(f: ActivationFile, block_rows: int) -> TensorSource:
    return TensorSource({"act": torch.from_numpy(f.read()["act"]).float()}, block_rows=block_rows)


# ---- writing and reading --------------------------------------------------------------------------


def test_writer_round_trip(tmp_path):
    n, d = 1000, 6
    g = torch.Generator().manual_seed(0)
    act = torch.randn(n, d, generator=g) * 3
    entropy, grad = torch.rand(n, generator=g) * 8, torch.randn(n, d, generator=g) * 1e-3
    docs = np.arange(n, dtype=np.int32) // 10
    pos, tokens = np.arange(n, dtype=np.int32) % 10, (np.arange(n, dtype=np.int32) * 7) % 301
    meta = {"step": 3, "layer": 1, "model": "m", "split": "train"}
    writer = ActivationWriter(tmp_path / "a.parquet", d, meta, ROW_GROUP, ("lm_entropy", "lm_grad"))
    cuts = [0, 1, 38, 100, 101, 350, 512, 513, 999, n]  # chunks that do not align with row groups
    for a, b in zip(cuts, cuts[1:], strict=False):
        writer.append(docs[a:b], pos[a:b], tokens[a:b], act[a:b], lm_entropy=entropy[a:b],
                      lm_grad=grad[a:b])  # fmt: skip
    with pytest.raises(ValueError, match="lm_entropy"):  # the file's extra columns, all of them
        writer.append(docs[:1], pos[:1], tokens[:1], act[:1], lm_grad=grad[:1])
    returned = writer.close()

    f = ActivationFile(tmp_path / "a.parquet")
    assert f.verified and f.n_rows == n and f.d_model == d
    assert f.row_group_rows == [ROW_GROUP] * 15 + [40]
    assert f.columns == ["doc_id", "pos", "token_id", "act", "lm_entropy", "lm_grad"]
    got = f.read(f.columns)
    assert got["act"].dtype == np.float16 and got["act"].shape == (n, d)
    assert np.array_equal(got["act"], act.half().numpy())
    assert got["lm_grad"].dtype == np.float32 and np.array_equal(got["lm_grad"], grad.numpy())
    assert np.array_equal(got["lm_entropy"], entropy.numpy())
    for name, expected in (("doc_id", docs), ("pos", pos), ("token_id", tokens)):
        assert got[name].dtype == np.int32 and np.array_equal(got[name], expected)

    assert returned == read_metadata(f.path) == f.metadata
    assert f.metadata | meta == f.metadata  # what the writer was given is kept
    assert f.metadata["format_version"] == FORMAT_VERSION and f.metadata["d_model"] == d
    # the norm statistics of the values stored (float16), computed here by brute force
    x = act.half().double()
    norms = x.norm(dim=1)
    assert f.norm == returned["norm"]
    assert f.norm["n_rows"] == n
    assert f.norm["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert f.norm["mean_squared_norm"] == pytest.approx((norms**2).mean().item(), rel=1e-6)
    centred = ((x - x.mean(0)) ** 2).sum(1).mean().item()
    assert f.norm["centred_mean_squared_norm"] == pytest.approx(centred, rel=1e-6)
    # vectors are stored plain and uncompressed: zstd saves little on float16 and reads slower
    chunk = pq.read_metadata(f.path).row_group(0).column(f.columns.index("act"))
    assert chunk.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in chunk.encodings


def test_row_groups_are_read_in_the_order_asked(tmp_path):
    f = indexed_file(tmp_path / "a.parquet")
    got = f.read_row_groups([5, 2, 15, 2])
    assert list(got) == ["act"] and got["act"].shape == (3 * 64 + 40, D)
    expected = np.concatenate([np.arange(320, 384), np.arange(128, 192), np.arange(960, 1000),
                               np.arange(128, 192)])  # fmt: skip
    assert np.array_equal(got["act"][:, 0], expected)
    both = f.read_row_groups([7, 0], ("pos", "act"))
    assert np.array_equal(both["pos"], np.r_[448:512, 0:64])
    assert np.array_equal(both["act"][:, 0], np.r_[448:512, 0:64])
    with pytest.raises(DataError, match=rf"{f.path}: has no column\(s\) \['lm_grad'\]"):
        f.read_row_groups([0], ("act", "lm_grad"))
    # the whole file, in file order
    whole = f.read(("doc_id", "act"))
    assert whole["act"].dtype == np.float16 and whole["act"].shape == (1000, 4)
    assert np.array_equal(whole["act"][:, 0], np.arange(1000.0))
    assert np.array_equal(whole["doc_id"], np.arange(1000))


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_discard_leaves_nothing_before_and_after_close(tmp_path):
    idx = np.arange(300, dtype=np.int32)
    writer = ActivationWriter(tmp_path / "a.parquet", D, {}, ROW_GROUP)
    writer.append(idx, idx, idx, torch.randn(300, D))  # row groups already written
    (tmp,) = files_in(tmp_path)
    assert tmp.startswith(".a.parquet.") and (tmp_path / tmp).stat().st_size > 300 * D * 2
    writer.discard()
    assert files_in(tmp_path) == []

    writer = ActivationWriter(tmp_path / "a.parquet", D, {}, ROW_GROUP)
    writer.append(idx, idx, idx, torch.randn(300, D))
    writer.close()
    assert files_in(tmp_path) == ["a.parquet"]
    writer.discard()  # a file of a job that failed later: it goes too
    assert files_in(tmp_path) == []


def test_a_full_disk_names_the_file_and_discard_leaves_nothing(tmp_path, monkeypatch):
    writer = ActivationWriter(tmp_path / "a.parquet", D, {}, 8, disk_full_advice="do this")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer._writer, "write_table", full)
    idx = np.arange(16, dtype=np.int32)
    with pytest.raises(ResourceError) as error:
        writer.append(idx, idx, idx, torch.zeros(16, D))  # two row groups: written now
    assert str(error.value) == (
        f"{tmp_path / 'a.parquet'}: No space left on device while writing it (the partial file is "
        "deleted); do this"
    )
    writer.discard()
    assert files_in(tmp_path) == []
    # the same when the disk fills up with the footer (or a file system reports it at close)
    writer = ActivationWriter(tmp_path / "c.parquet", D, {}, 8, disk_full_advice="do this")
    writer.append(idx[:4], idx[:4], idx[:4], torch.zeros(4, D))
    close = writer._writer.close

    def full_at_close():
        close()
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(writer._writer, "close", full_at_close)
    with pytest.raises(ResourceError, match=f"^{tmp_path / 'c.parquet'}: Disk quota exceeded"):
        writer.close()
    writer.discard()
    assert files_in(tmp_path) == []

    # any other error is not a full disk: it propagates as it is
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "denied")

    writer = ActivationWriter(tmp_path / "b.parquet", D, {}, 8)
    monkeypatch.setattr(writer._writer, "write_table", denied)
    with pytest.raises(PermissionError):
        writer.append(idx, idx, idx, torch.zeros(16, D))
    writer.discard()
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("bad", [float("nan"), 7e4, -float("inf")])
def test_writer_refuses_what_float16_cannot_hold(tmp_path, bad):
    writer = ActivationWriter(tmp_path / "w.parquet", 4, {}, 8)
    act = torch.zeros(3, 4)
    act[1, 2] = bad
    idx = np.arange(3, dtype=np.int32)
    with pytest.raises(DataError, match=f"{tmp_path / 'w.parquet'}: activations overflow float16"):
        writer.append(idx, idx, idx, act)
    writer.discard()
    assert files_in(tmp_path) == []


def test_an_empty_file_is_not_written(tmp_path):
    writer = ActivationWriter(tmp_path / "w.parquet", 4, {}, 8)
    with pytest.raises(DataError, match="no activations to write"):
        writer.close()
    writer.discard()
    assert files_in(tmp_path) == []


# ---- the order of batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "tensors"])
@pytest.mark.parametrize(
    ("batch_size", "buffer_rows"),
    [
        (96, 200),  # buffers of ~3 blocks, batches spanning buffers
        (64, 64),  # a block per buffer
        (50, 1),  # a block per buffer though it does not fit
        (100, 450),
        (37, 1000),  # the source fits: resident
        (128, 4096),  # resident
    ],
)
def test_batches_come_in_the_documented_order(tmp_path, kind, batch_size, buffer_rows):
    f = indexed_file(tmp_path / "a.parquet")
    source = FileSource(f) if kind == "file" else tensor_source(f, block_rows=100)
    n = 3 * N // batch_size  # three epochs
    expected = reference_batches(source.block_rows, 5, buffer_rows, batch_size, n)
    batches = source.batches(batch_size, ("act",), seed=5, buffer_rows=buffer_rows)
    assert np.array_equal(row_ids(batches, n), expected)
    for start in (1, n // 3, n // 3 + 1, n - 5):  # in and across buffers and epochs
        resumed = source.batches(batch_size, ("act",), 5, buffer_rows, start=start)
        assert np.array_equal(row_ids(resumed, 5), expected[start : start + 5]), start
    other_seed = source.batches(batch_size, ("act",), seed=6, buffer_rows=buffer_rows)
    assert not np.array_equal(row_ids(other_seed, n), expected)
    assert len(set(expected.ravel()[:N])) == N  # an epoch deals out every row once


@pytest.mark.parametrize("buffer_rows", [200, 1000])  # buffered, resident
def test_the_order_does_not_depend_on_the_columns(tmp_path, buffer_rows):
    """Every column of a batch is the same rows, a copy in float32 that later batches leave intact."""
    rows = torch.arange(N, dtype=torch.float32)
    writer = ActivationWriter(tmp_path / "a.parquet", D, {}, ROW_GROUP, ("lm_entropy", "lm_grad"))
    idx = np.arange(N, dtype=np.int32)
    writer.append(idx, idx, idx, rows[:, None].expand(N, D), lm_entropy=rows,
                  lm_grad=-rows[:, None].expand(N, D))  # fmt: skip
    writer.close()
    source = FileSource(ActivationFile(tmp_path / "a.parquet"))
    n = 3 * N // 96
    expected = torch.from_numpy(reference_batches(source.block_rows, 2, buffer_rows, 96, n))
    for columns in (("act",), ("lm_entropy", "act"), ("act", "lm_entropy", "lm_grad")):
        stream = source.batches(96, columns, seed=2, buffer_rows=buffer_rows)
        kept = [next(stream) for _ in range(n)]  # every buffer is dealt out, then dropped
        stream.close()
        for batch, ids in zip(kept, expected.float(), strict=True):
            assert sorted(batch) == sorted(columns)
            assert all(v.dtype == torch.float32 for v in batch.values())
            assert torch.equal(batch["act"], ids[:, None].expand(96, D))
            if "lm_entropy" in columns:
                assert torch.equal(batch["lm_entropy"], ids)
            if "lm_grad" in columns:
                assert torch.equal(batch["lm_grad"], -ids[:, None].expand(96, D))


def test_resident_and_buffered_deal_the_same_batches_for_the_same_buffering(tmp_path, monkeypatch):
    """A file of one row group larger than the buffer: one buffer per epoch, read every epoch;
    a buffer that fits it: the same buffer, read once and kept."""
    f = indexed_file(tmp_path / "a.parquet", row_group=N)
    assert f.row_group_rows == [N]  # no empty row group after it
    source = FileSource(f)
    n = 3 * N // 100  # exactly three epochs
    expected = reference_batches(source.block_rows, 1, N, 100, n)
    reads = record_row_group_reads(monkeypatch)
    assert np.array_equal(row_ids(source.batches(100, ("act",), 1, buffer_rows=N), n), expected)
    assert reads == [0]  # resident
    reads.clear()
    assert np.array_equal(row_ids(source.batches(100, ("act",), 1, buffer_rows=600), n), expected)
    assert reads == [0, 0, 0]  # a buffer at a time: once per epoch


def buffers_of_batch(buffers, batch_size, k) -> list[list[int]]:
    """The blocks of each reference buffer that batch k takes rows from."""
    first, end = k * batch_size, (k + 1) * batch_size
    return [blocks for start, stop, blocks in buffers if start < end and stop > first]


def test_a_source_started_far_ahead_reads_only_the_buffers_it_deals_from(tmp_path, monkeypatch):
    f = indexed_file(tmp_path / "a.parquet")
    source = FileSource(f)
    batch_size, buffer_rows = 16, 200
    _, buffers = reference_order(source.block_rows, 3, buffer_rows, 4 * N)
    ahead = range(2 * N // batch_size, 4 * N // batch_size)  # in the third and fourth epochs
    starts = {start for start, _, _ in buffers}
    cases = {
        "inside a buffer": [
            k for k in ahead
            if len(buffers_of_batch(buffers, batch_size, k)) == 1 and k * batch_size not in starts
        ],
        "at a buffer's start": [
            k for k in ahead if k * batch_size in starts and k * batch_size % N
        ],
        "across two buffers": [
            k for k in ahead if len(buffers_of_batch(buffers, batch_size, k)) == 2
        ],
    }  # fmt: skip
    expected = reference_batches(source.block_rows, 3, buffer_rows, batch_size, ahead.stop)
    reads = record_row_group_reads(monkeypatch)
    for case, ks in cases.items():
        assert ks, case
        k = ks[0]
        reads.clear()
        stream = source.batches(batch_size, ("act",), 3, buffer_rows, start=k)
        assert np.array_equal(row_ids(stream, 1)[0], expected[k]), case
        assert reads == sum(buffers_of_batch(buffers, batch_size, k), []), case


def test_a_buffered_source_reads_one_buffer_at_a_time(tmp_path, monkeypatch):
    """Each read is one buffer (the memory bound `memory_bytes` states), read when the first
    batch that needs it is dealt out, not before."""
    f = indexed_file(tmp_path / "a.parquet")
    source = FileSource(f)
    batch_size, buffer_rows = 96, 200
    bound = source.memory_bytes(("act",), buffer_rows)
    assert bound < N * D * 2  # less than the file's values
    calls, sizes = [], []
    original = ActivationFile.read_row_groups

    def recorded(self, ids, columns=("act",)):
        calls.append(list(ids))
        out = original(self, ids, columns)
        sizes.append(sum(v.nbytes for v in out.values()))
        return out

    monkeypatch.setattr(ActivationFile, "read_row_groups", recorded)
    _, buffers = reference_order(source.block_rows, 4, buffer_rows, 3 * N)
    stream = source.batches(batch_size, ("act",), 4, buffer_rows)
    for k in range(3 * N // batch_size):
        next(stream)
        dealt = (k + 1) * batch_size  # rows dealt out so far
        assert calls == [blocks for start, _, blocks in buffers if start < dealt], k
    assert max(sizes) <= bound
    stream.close()


def test_start_must_not_be_negative(tmp_path):
    f = indexed_file(tmp_path / "a.parquet")
    for source in (FileSource(f), tensor_source(f, block_rows=64)):
        with pytest.raises(ValueError, match="start -1 must be >= 0"):
            next(source.batches(64, ("act",), 0, 200, start=-1))


# ---- standard tools read the files as numbers ------------------------------------------------------


def test_pandas_and_hf_datasets_read_the_vectors_as_numbers(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    f = indexed_file(tmp_path / "a.parquet")
    path = f.path
    stored = f.read()["act"]
    column = pd.read_parquet(path)["act"]
    assert len(column) == N
    assert all(r.dtype == np.float16 and r.shape == (D,) for r in column)
    assert np.array_equal(np.stack(column.to_list()), stored)
    # the README's one-liner, as it is there
    act = datasets.Dataset.from_parquet(str(path)).with_format("numpy")[:]["act"]
    assert act.shape == (N, D)
    assert np.array_equal(act, stored.astype(act.dtype))


def test_the_readme_lines_read_an_activation_file_as_numbers(tmp_path, monkeypatch):
    """The two one-liners of README's Outputs section, run as they are there (on a file of ours)."""
    import re

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    f = indexed_file(tmp_path / "a.parquet")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for block in re.findall(r"```python\n(.*?)```", readme, re.S)
             for line in block.splitlines() if "activations/" in line and '["act"]' in line]  # fmt: skip
    assert len(lines) == 2, lines
    for line in lines:
        code = re.sub(r'"results/[^"]+\.parquet"', repr(str(f.path)), line)
        namespace = {"pd": pd, "datasets": datasets}
        exec(code, namespace)
        acts = np.stack(list(namespace["acts"]))
        assert acts.shape == (N, D) and np.array_equal(acts, f.read()["act"].astype(acts.dtype))
