"""Activation I/O with threads: the background writer and the prefetching shuffled reader.

The order of `ActivationFile.shuffled` is part of reproducibility: a seed must give the same batches
whatever the thread timing, prefetch depth or number of decoding threads.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from saedynamics import activations
from saedynamics.activations import ActivationFile, ActivationWriter
from saedynamics.errors import DataError

from .synthetic import indexed_activation_file as indexed_file
from .synthetic import record_row_group_reads


def reference_order(f: ActivationFile, batch_size, seed, buffer_row_groups, n_batches):
    """Row indices of the first batches, by the algorithm `shuffled` documents, without threads."""
    rng = np.random.default_rng(seed)
    meta = pq.ParquetFile(f.path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    rows_in = np.split(np.arange(f.n_rows), np.cumsum(sizes)[:-1])
    out, leftover = [], np.empty(0, dtype=int)
    while len(out) < n_batches:
        groups = rng.permutation(f.num_row_groups)
        for start in range(0, len(groups), buffer_row_groups):
            rows = np.concatenate(
                [leftover, *(rows_in[g] for g in groups[start : start + buffer_row_groups])]
            )
            rows = rows[rng.permutation(len(rows))]
            n_full = len(rows) // batch_size * batch_size
            out += list(rows[:n_full].reshape(-1, batch_size))
            leftover = rows[n_full:]
    return np.stack(out[:n_batches])


def first_batches(stream, n):
    batches = [next(stream)["act"][:, 0].numpy().astype(int) for _ in range(n)]
    stream.close()
    return np.stack(batches)


def test_shuffled_order_depends_on_the_seed_only(tmp_path, monkeypatch):
    f = indexed_file(tmp_path / "a.parquet")
    n = 3 * 1000 // 96  # three epochs
    expected = reference_order(f, 96, seed=5, buffer_row_groups=3, n_batches=n)
    for prefetch, threads in ((0, 1), (1, 1), (2, 3)):
        got = first_batches(
            f.shuffled(96, 5, buffer_row_groups=3, prefetch=prefetch, decode_threads=threads), n
        )
        assert np.array_equal(got, expected), (prefetch, threads)
    # row groups decoded in chunks (of 5 rows here, which do not divide them) change nothing
    monkeypatch.setattr(activations, "DECODE_CHUNK_BYTES", 5 * 4 * 2)
    got = first_batches(f.shuffled(96, 5, buffer_row_groups=3, prefetch=1, decode_threads=2), n)
    assert np.array_equal(got, expected)
    # decoding threads that finish in a random order change nothing
    original = ActivationFile.iter_row_group

    def slow_read(self, i, columns=("act",), **options):
        for chunk in original(self, i, columns, **options):
            time.sleep(random.random() * 0.005)
            yield chunk

    monkeypatch.setattr(ActivationFile, "iter_row_group", slow_read)
    got = first_batches(f.shuffled(96, 5, buffer_row_groups=3, prefetch=2, decode_threads=3), n)
    assert np.array_equal(got, expected)
    assert not np.array_equal(first_batches(f.shuffled(96, 6, buffer_row_groups=3), n), expected)


def test_batches_kept_stay_intact_while_the_buffers_are_reused(tmp_path, monkeypatch):
    """Every column of a batch is a copy: a float32 one too, not a view of a reused buffer."""
    monkeypatch.setattr(activations, "DECODE_CHUNK_BYTES", 100)  # 3 rows of 28 bytes a chunk
    n, d = 1000, 4
    writer = ActivationWriter(tmp_path / "a.parquet", d, {}, 64, ("lm_entropy", "lm_grad"))
    idx = np.arange(n, dtype=np.int32)
    rows = torch.arange(n, dtype=torch.float32)
    writer.append(
        idx,
        idx,
        idx,
        rows[:, None].expand(n, d),
        lm_entropy=rows,
        lm_grad=-rows[:, None].expand(n, d),
    )
    writer.close()
    f = ActivationFile(tmp_path / "a.parquet")
    columns = ("act", "lm_entropy", "lm_grad")
    n_batches = 3 * n // 96  # three epochs: every buffer is reused many times
    expected = reference_order(f, 96, seed=2, buffer_row_groups=3, n_batches=n_batches)
    for prefetch in (0, 2):
        stream = f.shuffled(96, 2, columns, buffer_row_groups=3, prefetch=prefetch)
        kept = [next(stream) for _ in range(n_batches)]
        stream.close()
        for batch, ids in zip(kept, torch.from_numpy(expected).float(), strict=True):
            assert all(v.dtype == torch.float32 for v in batch.values())
            assert torch.equal(batch["act"], ids[:, None].expand(96, d))
            assert torch.equal(batch["lm_entropy"], ids)
            assert torch.equal(batch["lm_grad"], -ids[:, None].expand(96, d))


def test_prefetch_reads_a_bounded_number_of_row_groups_ahead(tmp_path, monkeypatch):
    f = indexed_file(tmp_path / "a.parquet", n=2048)  # 32 row groups
    calls = record_row_group_reads(monkeypatch)
    stream = f.shuffled(128, seed=0, buffer_row_groups=4, prefetch=1)
    next(stream)
    time.sleep(0.5)  # let the reader thread run ahead as far as it may
    # the buffer in use, one in the queue, one waiting for room in the queue
    assert 4 <= len(calls) <= 3 * 4
    stream.close()


def reader_threads(path) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(("read ", "decode ")) and path.name in t.name
    ]


def test_closing_the_stream_stops_its_threads(tmp_path):
    f = indexed_file(tmp_path / "a.parquet")
    stream = f.shuffled(64, seed=0)
    next(stream)
    assert reader_threads(f.path)
    stream.close()
    assert not reader_threads(f.path)
    stream = f.shuffled(64, seed=0)
    next(stream)
    del stream  # dropped without close(), as a trainer that returns early does
    assert not reader_threads(f.path)


def test_a_corrupt_row_group_raises_from_the_reader_thread(tmp_path):
    f = indexed_file(tmp_path / "a.parquet")
    data = bytearray(f.path.read_bytes())
    act = f._file.metadata.row_group(5).column(f.columns.index("act"))
    data[act.data_page_offset : act.data_page_offset + 16] = b"\xff" * 16  # its page header
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    stream = ActivationFile(bad, verify=False).shuffled(64, seed=0, prefetch=2)  # not at open
    with pytest.raises(DataError, match=f"{bad}: row group 5 is unreadable"):
        for _ in range(1000 // 64 + 1):  # one epoch reaches every row group
            next(stream)
    assert not reader_threads(bad)


def test_writer_writes_exact_row_groups_in_the_background(tmp_path):
    f = indexed_file(tmp_path / "a.parquet", n=1000, row_group=64)
    meta = pq.ParquetFile(f.path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [64] * 15 + [40]
    assert np.array_equal(torch.cat(list(f.tensors(100)))[:, 0].numpy(), np.arange(1000))
    act = meta.row_group(0).column(f.columns.index("act"))
    # vectors are stored plain and uncompressed: zstd saves little on float16 and reads 2x slower
    assert act.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in act.encodings


def test_writer_errors_surface_and_abort_leaves_nothing(tmp_path, monkeypatch):
    writer = ActivationWriter(tmp_path / "w.parquet", 4, {}, 8)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer._writer, "write_table", fail)
    idx = np.arange(16, dtype=np.int32)
    writer.append(idx, idx, idx, torch.zeros(16, 4))  # handed to the writer thread
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), 7e4, -float("inf")])
def test_writer_refuses_what_float16_cannot_hold(tmp_path, bad):
    writer = ActivationWriter(tmp_path / "w.parquet", 4, {}, 8)
    act = torch.zeros(3, 4)
    act[1, 2] = bad
    idx = np.arange(3, dtype=np.int32)
    with pytest.raises(DataError, match="overflow float16"):
        writer.append(idx, idx, idx, act)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
