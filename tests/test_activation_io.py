"""Activation I/O with threads: the background writer and the prefetching shuffled reader.

The order of `ActivationFile.shuffled` is part of reproducibility: a seed must give the same batches
whatever the thread timing, prefetch depth or number of decoding threads.
"""

from __future__ import annotations

import random
import threading
import time
from itertools import pairwise

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from saedynamics import activations
from saedynamics import parquet_pages as pages
from saedynamics.activations import ActivationFile, ActivationWriter
from saedynamics.errors import DataError
from saedynamics.parquet_pages import CompactReader, CorruptPage

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
    # vectors decoded by pyarrow, staged in chunks (of 5 rows here, which do not divide the row
    # groups), by decoding threads that finish in a random order: the same batches
    f._read_pages = False
    monkeypatch.setattr(activations, "DECODE_CHUNK_BYTES", 5 * 4 * 2)
    got = first_batches(f.shuffled(96, 5, buffer_row_groups=3, prefetch=1, decode_threads=2), n)
    assert np.array_equal(got, expected)
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


# ---- vector pages read in place (parquet_pages) -----------------------------------------------------


def test_compact_reader_decodes_hand_built_bytes():
    """Thrift compact protocol, expected values worked out by hand."""
    # varints: 300 = 0b10_0101100 -> 0xAC 0x02; 624485 = 0b100110_0001110_1100101 -> E5 8E 26
    assert CompactReader(b"\xac\x02", 0, 2).varint() == 300
    assert CompactReader(b"\xe5\x8e\x26", 0, 3).varint() == 624485
    # zigzag: 0 -> 0, -1 -> 1, 1 -> 2, -2 -> 3, ..., -64 -> 127, 300 -> 600 (0xD8 0x04)
    assert [CompactReader(bytes([b]), 0, 1).zigzag() for b in (0, 1, 2, 3, 127)] == [
        0,
        -1,
        1,
        -2,
        -64,
    ]
    assert CompactReader(b"\xd8\x04", 0, 2).zigzag() == 300
    assert CompactReader(b"\xd7\x04", 0, 2).zigzag() == -300  # 599
    struct = bytes(
        [
            0x15, 0x03,  # field 1 (delta 1), i32: zigzag 3 = -2
            0x2C,  # field 3 (delta 2), a struct, skipped:
            0x18, 0x02, *b"ab",  # its field 1, binary of 2 bytes
            0x19, 0x35, 0x02, 0x04, 0x06,  # its field 2, list of 3 i32 (1, 2, 3)
            0x1C, 0x1A, 0x21, 0x01, 0x02, 0x00,  # field 3: struct{field 1: set of 2 bools}
            0x00,  # its end
            0x11,  # field 4 (delta 1), bool true: the value is the type
            0x06, 0x28, 0xD7, 0x04,  # delta 0: i64, id zigzag 40 = 20 in full, -300
            0x17, *b"12345678",  # field 21 (delta 1), a double, skipped
            0x1B, 0x02, 0x85, 0x01, *b"x", 0x02, 0x01, *b"y", 0x04,  # field 22, map<binary, i32>
            0x19, 0xF5, 0x10, *[0x02] * 16,  # field 23, a list of 16 i32: size 15 means "follows"
            0x15, 0x0E,  # field 24, i32 7
            0x00,  # the end
        ]
    )  # fmt: skip
    reader = CompactReader(struct, 0, len(struct))
    got = {}
    for field, kind in reader.fields():
        if kind in (pages.TRUE, pages.FALSE):
            got[field] = reader.boolean(kind)
        elif field in (1, 20, 24):
            got[field] = reader.integer(kind)
        else:
            reader.skip(kind)
    assert got == {1: -2, 4: True, 20: -300, 24: 7}
    assert reader.pos == len(struct)


@pytest.mark.parametrize(
    "data",
    [
        b"\x15\x80\x80",  # field 1, an i32 whose varint is cut short
        b"\x15" + b"\xff" * 11,  # field 1, an i32 whose varint runs past 64 bits
        b"\x19\x35\x02",  # a list of 3 elements, 1 there
        b"\x19\xf5\xff\xff\xff\xff\x0f",  # a list of 2^32 elements
        b"\x18\x7f",  # a binary of 127 bytes, none there
        b"\x1d",  # type 13 does not exist
        b"\x1c" * 100,  # structs nested 100 deep
    ],
)
def test_compact_reader_refuses_corrupt_bytes(data):
    reader = CompactReader(data, 0, len(data))
    with pytest.raises(CorruptPage):
        for _, kind in reader.fields():
            reader.skip(kind)


def written_file(
    path, monkeypatch, n=1000, d=4, row_group=64, extras=(), **options
) -> ActivationFile:
    """An activation file through ActivationWriter, its Parquet options changed by `options`
    (e.g. data_page_size); act[:, 0] is the row index, the rest random."""
    original = activations._parquet_options
    with monkeypatch.context() as m:
        m.setattr(activations, "_parquet_options", lambda schema: original(schema) | options)
        writer = ActivationWriter(path, d, {}, row_group, extras)
        rng = np.random.default_rng(n + d)
        act = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
        act[:, 0] = torch.arange(n)
        columns = {}
        if "lm_entropy" in extras:
            columns["lm_entropy"] = act[:, 1]
        if "lm_grad" in extras:
            columns["lm_grad"] = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
        idx = np.arange(n, dtype=np.int32)
        writer.append(idx, idx, idx, act, **columns)
        writer.close()
    return ActivationFile(path)


def read_both_ways(f: ActivationFile, i: int, columns) -> tuple[dict, dict, dict]:
    """Row group i read in place (whole and in chunks) and through pyarrow."""
    whole = f.read_row_group(i, columns)
    chunked = list(f.iter_row_group(i, columns, chunk_bytes=300))
    chunked = {c: np.concatenate([part[c] for part in chunked]) for c in columns}
    f._read_pages = False
    try:
        reference = f.read_row_group(i, columns)
    finally:
        f._read_pages = True
    return whole, chunked, reference


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("n", "d", "row_group", "options"),
    [
        (1000, 4, 64, {}),
        (3000, 48, 1000, {}),
        (5000, 512, 2048, {}),  # 1 KiB rows: a row group in 1 MiB pages of 1024 rows
        (700, 16, 256, {"data_page_size": 256, "write_batch_size": 7}),  # many pages each
        (700, 16, 256, {"data_page_version": "2.0", "data_page_size": 300, "write_batch_size": 5}),
    ],
)
def test_vectors_read_in_place_are_pyarrows_bytes(tmp_path, monkeypatch, n, d, row_group, options):
    f = written_file(tmp_path / "a.parquet", monkeypatch, n, d, row_group, **options)
    several_pages = False
    for i in range(f.num_row_groups):
        layout = f._page_layout(i, "act")
        assert layout is not None  # read in place, not through pyarrow
        several_pages |= len(layout.offsets) > 1
        whole, chunked, reference = read_both_ways(f, i, ("act", "doc_id"))
        for got in (whole, chunked):
            assert all(same_bytes(got[c], reference[c]) for c in ("act", "doc_id"))
        if len(layout.offsets) == 1:  # one page: a view of the mapped file, no copy
            assert np.shares_memory(whole["act"], f._bytes) and not whole["act"].flags.writeable
        # the rows `shuffled` gathers from the file: row r's bytes start at at[r], counted by hand
        at = f._row_addresses(i, "act")
        by_hand = [
            offset + (r - start) * 2 * d
            for offset, (start, stop) in zip(layout.offsets, pairwise(layout.starts), strict=True)
            for r in range(start, stop)
        ]
        assert at.dtype == np.int64 and at.tolist() == by_hand
        gathered = f._file_rows("act").index_select(0, torch.from_numpy(at[::-1].copy()))
        assert gathered.numpy().tobytes() == reference["act"][::-1].tobytes()
    assert several_pages == (d == 512 or bool(options))


def test_vector_columns_of_other_widths_are_read_in_place(tmp_path, monkeypatch):
    """lm_grad (float32) beside act (float16): their pages end at different rows."""
    columns = ("act", "lm_entropy", "lm_grad", "pos")
    f = written_file(
        tmp_path / "a.parquet",
        monkeypatch,
        800,
        8,
        200,
        ("lm_entropy", "lm_grad"),
        data_page_size=512,
        write_batch_size=9,
    )
    act, grad = f._page_layout(0, "act"), f._page_layout(0, "lm_grad")
    assert act is not None and grad is not None
    assert not np.array_equal(act.starts, grad.starts)
    assert f._page_layout(0, "lm_entropy") is None  # a scalar: zstd, dictionary
    for i in range(f.num_row_groups):
        whole, chunked, reference = read_both_ways(f, i, columns)
        assert reference["lm_grad"].dtype == np.float32
        assert all(same_bytes(whole[c], reference[c]) for c in columns)
        assert all(same_bytes(chunked[c], reference[c]) for c in columns)


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "zstd"},
        {"use_dictionary": True},
        {"data_page_size": 64, "write_batch_size": 3, "compression": "snappy"},
    ],
)
def test_other_encodings_fall_back_to_pyarrow_with_the_same_batches(tmp_path, monkeypatch, options):
    plain = written_file(tmp_path / "plain.parquet", monkeypatch)
    other = written_file(tmp_path / "other.parquet", monkeypatch, **options)
    assert all(other._page_layout(i, "act") is None for i in range(other.num_row_groups))
    assert other.read_row_group(3)["act"].tobytes() == plain.read_row_group(3)["act"].tobytes()
    n = 3 * 1000 // 96
    a = plain.shuffled(96, seed=1, buffer_row_groups=3)
    b = other.shuffled(96, seed=1, buffer_row_groups=3)
    for _ in range(n):
        assert torch.equal(next(a)["act"], next(b)["act"])
    a.close()
    b.close()


def corrupt_copy(f: ActivationFile, path, offset: int, value: int):
    data = bytearray(f.path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))
    return ActivationFile(path, verify=False)


def read_or_error(f: ActivationFile, i: int, read_pages: bool) -> bytes | DataError:
    f._read_pages = read_pages
    try:
        return f.read_row_group(i)["act"].tobytes()
    except DataError as e:
        return e
    finally:
        f._read_pages = True


def test_a_corrupt_page_header_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    """Every byte of two page headers flipped or replaced: a DataError naming the file and row
    group, or (a byte that does not matter, or one that makes the header one that is not read
    in place) what pyarrow reads; never another error. The checksum at open catches the rest."""
    f = written_file(tmp_path / "a.parquet", monkeypatch, data_page_size=128, write_batch_size=5)
    layout = f._page_layout(5, "act")
    chunk = f._file.metadata.row_group(5).column(f.columns.index("act"))
    header = range(chunk.data_page_offset, layout.offsets[0])  # the first page's header
    second = range(layout.offsets[0] + 20 * 8, layout.offsets[1])  # the second's
    assert len(header) == len(second) > 10
    rng = np.random.default_rng(0)
    errors = 0
    for offset in [*header, *second]:
        for value in (f._bytes[offset] ^ 0xFF, f._bytes[offset] ^ 0x01, rng.integers(256)):
            bad = corrupt_copy(f, tmp_path / "bad.parquet", offset, int(value))
            fast, slow = read_or_error(bad, 5, True), read_or_error(bad, 5, False)
            if isinstance(fast, DataError):
                assert f"{bad.path}: row group 5 is unreadable" in str(fast)
                errors += 1
            elif bad._page_layout(5, "act") is None:
                assert fast == slow, (offset, value)
            else:  # read in place: a field that does not matter here (a level encoding)
                assert fast == f.read_row_group(5)["act"].tobytes(), (offset, value)
            del bad
    assert errors > len(header) + len(second)  # most do matter
    # in the fast path itself (pyarrow is never asked), from the reader thread
    bad = corrupt_copy(f, tmp_path / "bad.parquet", layout.offsets[1] - 3, 0xFF)
    assert bytes(bad._bytes[layout.offsets[1] - 3 : layout.offsets[1]]) == b"\xff\x00\x00"
    monkeypatch.setattr(ActivationFile, "_parquet", None)  # a TypeError if pyarrow were asked
    stream = bad.shuffled(64, seed=0, prefetch=2)
    with pytest.raises(DataError, match=f"{bad.path}: row group 5 is unreadable"):
        for _ in range(1000 // 64 + 1):  # one epoch reaches every row group
            next(stream)
    assert not reader_threads(bad.path)


def test_a_page_of_unknown_type_is_a_data_error_not_missing_rows(tmp_path, monkeypatch):
    # pyarrow skips a data page whose header names an unknown page type and returns the row group
    # short of its rows; the reader counts them against the footer (with verify=False too)
    f = written_file(tmp_path / "a.parquet", monkeypatch, data_page_size=128, write_batch_size=5)
    chunk = f._file.metadata.row_group(5).column(f.columns.index("act"))
    first = chunk.data_page_offset
    # PageHeader field 1 (type, an i32): header byte 0x15, then the zigzag varint of the type
    assert bytes(f._bytes[first : first + 2]) == b"\x15\x00"  # DATA_PAGE
    bad = corrupt_copy(f, tmp_path / "bad.parquet", first + 1, 2 * 9)  # page type 9: no such type
    assert bad._page_layout(5, "act") is None  # read through pyarrow
    for read in (
        lambda: bad.read_row_group(5),
        lambda: list(bad.iter_row_group(5, chunk_bytes=64)),
        lambda: next(bad.shuffled(1000, seed=0, buffer_row_groups=16)),
    ):
        with pytest.raises(DataError, match=f"{bad.path}: row group 5 is unreadable.*rows decoded"):
            read()


def test_shuffled_batches_are_the_same_with_pages_read_in_place_or_not(tmp_path, monkeypatch):
    columns = ("act", "lm_entropy", "lm_grad")
    f = written_file(
        tmp_path / "a.parquet",
        monkeypatch,
        1000,
        8,
        64,
        ("lm_entropy", "lm_grad"),
        data_page_size=300,
        write_batch_size=7,
    )
    calls = []
    original = activations.plain_pages
    monkeypatch.setattr(
        activations, "plain_pages", lambda *args: calls.append(1) or original(*args)
    )
    n = 2 * 1000 // 96
    streams = {}
    for read_pages in (True, False):
        f._read_pages = read_pages
        f._pages.clear()
        stream = f.shuffled(96, 3, columns, buffer_row_groups=3, decode_threads=2)
        streams[read_pages] = [next(stream) for _ in range(n)]
        stream.close()
        for start in (5, 11):  # resumed at a batch inside a buffer, and at one that starts one
            resumed = f.shuffled(96, 3, columns, buffer_row_groups=3, start_batch=start)
            for expected in streams[read_pages][start : start + 4]:
                assert all(torch.equal(v, expected[c]) for c, v in next(resumed).items())
            resumed.close()
        assert bool(calls) == read_pages
        calls.clear()
    for fast, slow in zip(streams[True], streams[False], strict=True):
        assert all(torch.equal(fast[c], slow[c]) for c in columns)


def test_row_groups_read_in_place_or_not_in_one_file_give_the_same_batches(tmp_path, monkeypatch):
    """Row groups whose vectors must be decoded beside ones gathered from the file (a file written
    by other means): the same batches, the rows left over passed from one kind of buffer on to
    the other."""
    columns = ("act", "lm_entropy", "lm_grad")
    f = written_file(tmp_path / "a.parquet", monkeypatch, 1000, 8, 64, ("lm_entropy", "lm_grad"))
    n = 3 * 1000 // 96
    expected = reference_order(f, 96, seed=4, buffer_row_groups=3, n_batches=n)
    in_place = f.shuffled(96, 4, columns, buffer_row_groups=3)
    reference = [next(in_place) for _ in range(n)]
    in_place.close()
    original = ActivationFile._vector_pages
    decoded = {3, 4, 9, 12}  # of 16 row groups: some buffers all in place, some not
    monkeypatch.setattr(
        ActivationFile,
        "_vector_pages",
        lambda self, i, c: {} if i in decoded else original(self, i, c),
    )
    staged = record_row_group_reads(monkeypatch)
    in_file = []  # per buffer: is act gathered from the file (else from a staging buffer)?
    buffers = ActivationFile._shuffled_buffers

    def recorded(self, *args, **kwargs):
        for buffer in buffers(self, *args, **kwargs):
            in_file.append(buffer.sources["act"][0].stride() == (1, 1))
            yield buffer

    monkeypatch.setattr(ActivationFile, "_shuffled_buffers", recorded)
    for start in (0, 7):  # and resumed inside a buffer
        stream = f.shuffled(
            96, 4, columns, buffer_row_groups=3, decode_threads=2, start_batch=start
        )
        for i in range(start, n):
            batch = next(stream)
            assert all(torch.equal(batch[c], reference[i][c]) for c in columns), (start, i)
            assert np.array_equal(batch["act"][:, 0].numpy(), expected[i])
        stream.close()
    assert decoded <= set(staged)
    # both kinds, the leftover of one gathered from the file passed on to a staged one: a buffer is
    # gathered from the file when all its rows (leftover included) lie there as they are
    assert any(before and not now for before, now in pairwise(in_file)), in_file
