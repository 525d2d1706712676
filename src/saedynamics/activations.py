"""Activations: hooks -> Parquet shards, and the streaming reader that feeds training.

One forward pass per checkpoint writes `activations/step<N>/layer<L>/{train,eval}.parquet` for every
configured layer. Schema: doc_id int32, pos int32, token_id int32, act fixed_size_binary(2 d),
plus optional extra columns (EXTRA_COLUMNS) when an architecture needs them: lm_entropy float32,
lm_grad fixed_size_binary(4 d).
The hooked activation is the residual stream after block L, the output of `gpt_neox.layers[L]`
(= TransformerLens blocks.L.hook_resid_post). `output_hidden_states` is not used: its last entry is
after the final LayerNorm, not the raw residual (spec/measurements.md section 4.3).

Vector columns hold one value per row: the row's d = d_model values, little-endian, as raw bytes
(float16 for act, float32 for lm_grad), stored plain and uncompressed. Parquet decodes such a column
at memory speed; a fixed_size_list<float16> (activation format 1) is decoded value by value, ~20x
slower, since Parquet has no float16 type of its own. The metadata says how to read them: "d_model"
and "vectors" ({column: element dtype}), e.g. with numpy:
    np.frombuffer(column.buffers()[1], "<f2").reshape(len(column), d_model)  # an unsliced array

File metadata (key "saedynamics", JSON) holds format_version (2), d_model, vectors, model, revision,
commit, layer, hook, dtype, and the norm statistics of the stored values (E|x|, E|x|^2,
E|x - E x|^2) from which the trainer takes its input scale; the eval files also carry the LM's own
eval loss at this checkpoint. The stage's provenance is beside it, under its own key
(artifacts.provenance_metadata).

Checksum (footer key "saedynamics.checksum", JSON): the writer records, for every row group in file
order, its row count and a sha256 over its decoded content: for each column in schema order, the
column name in UTF-8, a NUL byte, then the values' bytes as stored (little-endian int32 / float16 /
float32; vectors row after row, i.e. their fixed_size_binary values concatenated). It is computed on
the writer thread from the very arrays handed to Parquet, so it checks the encoding, the disk and
the decoding end to end. `ActivationFile` verifies it when it opens a file (one decoding pass over
every column, on a few threads; a job opens its file once), before any compute, and names the first
row group that differs; `verify=False` skips that for a caller that has just verified or written the
file. A file without that key is read, with a warning that it cannot be verified (files from before
checksums existed are of format 1, refused anyway); rerunning the activations rule adds one. A
truncated file fails at open (no footer), a flipped byte in a page header when its row group is
decoded, a flipped value byte by the checksum.

The reader streams batches in a seeded shuffled order: row groups in a random order, a few at a
time in a buffer whose rows are shuffled, so memory stays bounded by the buffer, never the file.
The file is memory-mapped, and the vector columns are not decoded at all: in a page of a column
stored plain, uncompressed and without null flags, the values follow the page header as they are
(`parquet_pages` parses the headers, and says None for any other layout), so a batch is gathered
row by row straight from the mapped pages, as from a NumPy memmap. Any other column (the scalars,
or vectors of a file written by other means, e.g. compressed) is decoded by pyarrow into a staging
buffer and gathered from there; `verify` decodes every column with pyarrow, independently.

Both directions keep up by overlapping work (benchmarks/activations.py measures it): the writer
encodes Parquet on a background thread while the next forward pass runs; the reader locates the
next buffers' rows, reads their pages in from disk and decodes what must be decoded on background
threads while the trainer computes. Threads never decide the order of the rows: the shuffled order
depends on the seed alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import mmap
import os
import queue
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from saedynamics.artifacts import MANIFEST, atomic_file, provenance_metadata, read_json
from saedynamics.config import EXTRA_COLUMNS, ActivationsConfig
from saedynamics.errors import DataError, ResourceError
from saedynamics.parquet_pages import CorruptPage, plain_pages

log = logging.getLogger(__name__)

METADATA_KEY = b"saedynamics"
CHECKSUM_KEY = b"saedynamics.checksum"
# `shuffled` decodes row groups in chunks of this size and copies each on while it is still in the
# decoding thread's cache: with two decoding threads ~15% less CPU than whole row groups of 8 MiB.
# Vectors stored in place are gathered from the file's pages, never decoded.
DECODE_CHUNK_BYTES = 1 << 20
FORMAT_VERSION = 2  # bump when the file layout or its metadata changes
# format 1 stored the vector columns as fixed_size_list<float16|float32>[d_model] (slow to decode)


# Vector columns: the element type of each (the `act` activations are float16, the vector extra
# columns float32); stored as fixed_size_binary(d_model * itemsize), see the module docstring.
ACT_DTYPE = "float16"
EXTRA_VECTOR_DTYPE = "float32"


def vector_dtypes(extra_columns=()) -> dict[str, str]:
    """{column: element dtype} of the vector columns of a file with these extra columns."""
    out = {"act": ACT_DTYPE}
    out |= {name: EXTRA_VECTOR_DTYPE for name in extra_columns if EXTRA_COLUMNS[name]["vector"]}
    return out


def schema(d_model: int, extra_columns=()) -> pa.Schema:
    vectors = vector_dtypes(extra_columns)
    fields = [
        pa.field("doc_id", pa.int32()),
        pa.field("pos", pa.int32()),
        pa.field("token_id", pa.int32()),
    ]
    for name in ("act", *extra_columns):
        if name in vectors:  # non-null: Parquet then stores no per-row null flags
            width = d_model * np.dtype(vectors[name]).itemsize
            fields.append(pa.field(name, pa.binary(width), nullable=False))
        else:
            fields.append(pa.field(name, pa.float32()))
    return pa.schema(fields)


def _parquet_options(schema: pa.Schema) -> dict:
    """Encoding per column: vectors plain and uncompressed, scalars zstd with dictionaries.

    Measured on float16 activations: zstd saves ~6% of the bytes but decodes ~1.5x slower,
    dictionary encoding (pyarrow's default) 3x slower still, and min/max statistics of every
    vector value halve the write speed while no reader filters on them.
    """
    vectors = [f.name for f in schema if isinstance(f.type, pa.FixedSizeBinaryType)]
    scalars = [f.name for f in schema if f.name not in vectors]
    return {
        "compression": {name: "none" if name in vectors else "zstd" for name in schema.names},
        "use_dictionary": scalars,
        "write_statistics": scalars,
    }


def _value_bytes(array: pa.Array) -> memoryview | np.ndarray:
    """The bytes of an array's values as stored, without a copy where possible (honours slices)."""
    if isinstance(array.type, pa.FixedSizeBinaryType):
        width = array.type.byte_width
        return memoryview(array.buffers()[1])[
            array.offset * width : (array.offset + len(array)) * width
        ]
    return np.ascontiguousarray(array.to_numpy(zero_copy_only=False)).view(np.uint8)


def vector_values(array: pa.Array, dtype: str) -> np.ndarray:
    """A vector column's values as a read-only [rows, d] array of `dtype`, a view of its buffer."""
    width = array.type.byte_width
    return _vectors_at(array.buffers()[1], array.offset * width, len(array), width, dtype)


def _vectors_at(buffer, offset: int, rows: int, width: int, dtype: str) -> np.ndarray:
    """`rows` vectors of `width` bytes each, stored as little-endian `dtype` from byte `offset` of
    `buffer`, as a read-only [rows, d] array: a view (a byteswapped copy on a big-endian host)."""
    little = np.dtype(dtype).newbyteorder("<")
    values = np.frombuffer(buffer, little, rows * width // little.itemsize, offset).reshape(
        rows, width // little.itemsize
    )
    return values if little.isnative else values.astype(little.newbyteorder("="))


def row_group_digest(table: pa.Table) -> str:
    """sha256 of one row group's content, as defined in the module docstring."""
    digest = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns, strict=True):
        digest.update(name.encode() + b"\0")
        for chunk in column.chunks:
            digest.update(_value_bytes(chunk))
    return digest.hexdigest()


class ActivationWriter:
    """Append rows; written in row groups of `row_group_rows`; renamed into place on `close()`.

    `append` does the cheap part on the caller's thread (float16 conversion and the norm
    statistics, on the activations' device) and hands the Parquet encoding and writing to a
    background thread, so that the next forward pass runs meanwhile (pyarrow releases the GIL).
    At most `max_pending` writes wait: a slow disk throttles the forward pass instead of memory
    filling up. An error of the background thread is raised by a later `append` or by `close`;
    a full disk as a ResourceError naming the file, ending with `disk_full_advice`.
    `provenance`, if given, is written into the footer with the metadata.
    """

    def __init__(
        self,
        path: Path,
        d_model: int,
        metadata: dict,
        row_group_rows: int,
        extra_columns=(),
        max_pending: int = 2,
        provenance: dict | None = None,
        disk_full_advice: str = "free space there and rerun",
    ):
        self.path, self.d_model = Path(path), d_model
        self.disk_full_advice = disk_full_advice
        self.vectors = vector_dtypes(extra_columns)
        self.metadata = {
            "format_version": FORMAT_VERSION,
            **metadata,
            "d_model": d_model,
            "vectors": self.vectors,
        }
        self.provenance = provenance
        self.row_group_rows = row_group_rows
        self.schema = schema(d_model, extra_columns)
        self._atomic = atomic_file(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, **_parquet_options(self.schema))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"write {self.path.name}")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending
        self._rows: list[pa.RecordBatch] = []  # appended, not yet handed to the writer thread
        self._buffered = 0
        self.n_rows = 0
        self._norm_sum = 0.0
        self._sq_norm_sum = 0.0
        self._sum = torch.zeros(d_model, dtype=torch.float64)
        self._digests: list[list] = []  # [rows, sha256] per row group written (module docstring)
        self._open = True

    def append(
        self,
        doc_id: np.ndarray,
        pos: np.ndarray,
        token_id: np.ndarray,
        act: torch.Tensor,
        **extras: torch.Tensor,
    ) -> None:
        """Add rows; `act` and the extras may be [..., d_model] / [...] on any device, in any dtype."""
        if {"act", *extras} != set(self.schema.names) - {"doc_id", "pos", "token_id"}:
            raise ValueError(
                f"append() got columns {sorted(extras)} besides act, the file has {self.schema.names}"
            )
        # convert on the activations' device: the copy to the host is then half as large
        half = act.detach().to(torch.float16).reshape(-1, self.d_model)
        self._add_statistics(half)
        columns = {"doc_id": doc_id, "pos": pos, "token_id": token_id, "act": half.cpu().numpy()}
        for name, value in extras.items():
            shape = (-1, self.d_model) if EXTRA_COLUMNS[name]["vector"] else (-1,)
            columns[name] = value.detach().to(torch.float32).reshape(shape).cpu().numpy()
        self._rows.append(self._record_batch(columns))
        self._buffered += len(doc_id)
        if self._buffered >= self.row_group_rows:
            self._flush(self._buffered // self.row_group_rows * self.row_group_rows)

    def _add_statistics(self, half: torch.Tensor) -> None:
        """Accumulate the norm statistics of exactly the stored (float16) values.

        Computed where the activations are and fetched in one transfer (one sync on a GPU);
        float32 per append, float64 across appends (a float64 sum over rows is 10x slower).
        """
        stored = half.float()
        norms = torch.linalg.vector_norm(stored, dim=1).double()  # inf/nan where a value is
        sums = torch.cat([norms.sum()[None], norms.square().sum()[None], stored.sum(0).double()])
        sums = sums.cpu()
        if not torch.isfinite(sums[:2]).all():
            raise DataError(
                f"{self.path}: activations overflow float16 (|x| > 65504) or are not finite; "
                "the checkpoint or model_dtype is likely broken"
            )
        self._norm_sum += sums[0].item()
        self._sq_norm_sum += sums[1].item()
        self._sum += sums[2:]

    def _record_batch(self, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
        arrays = []
        for field in self.schema:
            values = columns[field.name]
            if field.name in self.vectors:  # each row's values as one binary: a view, no copy
                values = np.ascontiguousarray(
                    values, np.dtype(self.vectors[field.name]).newbyteorder("<")
                )
                arrays.append(
                    pa.Array.from_buffers(field.type, len(values), [None, pa.py_buffer(values)])
                )
            else:
                arrays.append(pa.array(values, type=field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _flush(self, n: int) -> None:
        """Hand the first n buffered rows to the writer thread (no copy: a table of slices)."""
        table = pa.Table.from_batches(self._rows, schema=self.schema)
        rest = table.slice(n)
        self._rows = rest.to_batches() if rest.num_rows else []
        self._buffered -= n
        self.n_rows += n
        # .result() re-raises an error of the writer thread; waiting bounds the rows in memory
        while self._pending and (
            len(self._pending) >= self._max_pending or self._pending[0].done()
        ):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, table.slice(0, n)))

    def _write(self, table: pa.Table) -> None:
        """On the writer thread: one row group per `row_group_rows` rows, each with its digest."""
        for start in range(0, table.num_rows, self.row_group_rows):
            part = table.slice(start, self.row_group_rows)
            digest = row_group_digest(part)
            with self._disk_full_named():
                self._writer.write_table(part, row_group_size=self.row_group_rows)
            self._digests.append([part.num_rows, digest])

    @contextlib.contextmanager
    def _disk_full_named(self):
        """A full disk or quota (errno ENOSPC, EDQUOT) as a ResourceError naming this file: it
        would otherwise surface as a bare OSError of the writer thread, without a file name."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceError(
                f"{self.path}: {os.strerror(e.errno)} while writing it (the partial file is "
                f"deleted); {self.disk_full_advice}"
            ) from None

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        if self.n_rows == 0:
            raise DataError(f"{self.path}: no activations to write")
        mean = self._sum / self.n_rows
        self.metadata["norm"] = {
            "n_rows": self.n_rows,
            "mean_norm": self._norm_sum / self.n_rows,  # E|x|
            "mean_squared_norm": self._sq_norm_sum / self.n_rows,  # E|x|^2
            "centred_mean_squared_norm": self._sq_norm_sum / self.n_rows - mean.pow(2).sum().item(),
        }
        footer = {
            METADATA_KEY: json.dumps(self.metadata),
            CHECKSUM_KEY: json.dumps({"algorithm": "sha256", "row_groups": self._digests}),
        }
        if self.provenance is not None:
            footer |= provenance_metadata(self.provenance)
        self._writer.add_key_value_metadata(footer)
        with self._disk_full_named():  # the footer, and whatever the stream still buffers
            self._writer.close()
        written = pq.read_metadata(self._tmp)
        sizes = [written.row_group(i).num_rows for i in range(written.num_row_groups)]
        if sizes != [rows for rows, _ in self._digests]:  # pyarrow split a write: a bug here
            raise RuntimeError(
                f"{self.path}: row groups of {sizes} rows were written, digests taken of "
                f"{[rows for rows, _ in self._digests]}"
            )
        self._open = False
        self._atomic.__exit__(None, None, None)
        return self.metadata

    def abort(self) -> None:
        """Discard everything written so far (no-op once closed)."""
        if self._open:
            self._open = False
            self._pool.shutdown(cancel_futures=True)  # waits for a write in progress
            with contextlib.suppress(Exception):  # the file is discarded: its errors do not matter
                self._writer.close()
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


class ActivationFile:
    """Read access to one activation Parquet file; fails with the file named if it is not one.

    `verify`: check the content against the checksum in its footer now (module docstring), a
    pass over the whole file; False for a file this process has just written or verified.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as file:  # mapped once, read by all threads' readers
                self._source = pa.py_buffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
            self._bytes = np.frombuffer(self._source, np.uint8)  # the same map, to parse pages
            with warnings.catch_warnings():  # read-only: torch warns; `shuffled` only reads it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self._mapped = torch.from_numpy(self._bytes)  # the same map, to gather rows
            self._file = self._reader()
            meta = self._file.metadata.metadata or {}  # file footer key-value metadata
            self.metadata = json.loads(meta[METADATA_KEY])
            checksum = meta.get(CHECKSUM_KEY)
            self.checksum = None if checksum is None else json.loads(checksum)
        except FileNotFoundError:
            raise DataError(
                f"{self.path}: no such activation file; run the activations rule"
            ) from None
        except (OSError, pa.ArrowInvalid, KeyError, ValueError) as e:
            raise DataError(
                f"{self.path}: not a readable activation file ({type(e).__name__}: {e}); "
                "delete it and rerun the activations rule"
            ) from None
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: written in activation format {self.metadata.get('format_version')}, "
                f"this saedynamics reads format {FORMAT_VERSION} (vectors stored as one "
                "fixed_size_binary per row); rerun the activations rule (snakemake --forcerun "
                "activations)"
            )
        names = self._file.schema_arrow.names
        self.d_model, self._vectors = self._vector_layout(names)
        self.n_rows = self._file.metadata.num_rows
        self.num_row_groups = self._file.num_row_groups
        self._row_group_rows = [
            self._file.metadata.row_group(i).num_rows for i in range(self.num_row_groups)
        ]
        self._row_starts = np.cumsum([0, *self._row_group_rows])  # global row number of each
        self.columns = names
        leaves = self._file.metadata.schema
        self._leaf = {leaves.column(j).path: j for j in range(len(leaves))}  # Parquet's columns
        self._pages: dict[tuple[int, str], _Pages | None] = {}  # see _page_layout
        self._read_pages = True  # False: every column through pyarrow (the tests compare both)
        self._local = threading.local()  # a ParquetFile per decoding thread (see _parquet)
        self._local.file = self._file
        self.verified = False
        if self.checksum is None:
            log.warning(
                "%s: written before activation files carried a checksum; its content cannot be "
                "verified (rerun the activations rule to add one)",
                self.path,
            )
        elif verify:
            self.verify()

    def _vector_layout(self, names: list[str]) -> tuple[int, dict[str, str]]:
        """(d_model, {vector column: element dtype}) from the metadata, checked with the schema."""
        d_model, vectors = self.metadata.get("d_model"), self.metadata.get("vectors")
        if not isinstance(vectors, dict) or not isinstance(d_model, int) or d_model < 1:
            raise DataError(
                f"{self.path}: its metadata lacks d_model or the vector columns' dtypes "
                f"(d_model {d_model!r}, vectors {vectors!r}); rerun the activations rule "
                "(snakemake --forcerun activations)"
            )
        schema = self._file.schema_arrow
        for name in ["act", *sorted(set(vectors) - {"act"})]:
            expected = ACT_DTYPE if name == "act" else EXTRA_VECTOR_DTYPE
            width = d_model * np.dtype(expected).itemsize
            kind = schema.field(name).type if name in names else None
            if (
                vectors.get(name) != expected
                or not isinstance(kind, pa.FixedSizeBinaryType)
                or kind.byte_width != width
            ):
                raise DataError(
                    f"{self.path}: column {name!r} must be fixed_size_binary({width}), each row's "
                    f"{d_model} values as little-endian {expected} (metadata vectors.{name} "
                    f"{expected!r}); found {kind} (metadata {vectors.get(name)!r}); rerun the "
                    "activations rule (snakemake --forcerun activations)"
                )
        return d_model, dict(vectors)

    def verify(self, threads: int | None = None) -> None:
        """Decode every row group and compare it with the checksum recorded by the writer; raise
        DataError naming the file and the first row group that differs. One pass over the file,
        row groups decoded and hashed on `threads` threads (default: up to 4)."""
        checksum = self.checksum if isinstance(self.checksum, dict) else {}
        recorded = checksum.get("row_groups")
        if (
            checksum.get("algorithm") != "sha256"
            or not isinstance(recorded, list)
            or not all(isinstance(r, list) and len(r) == 2 for r in recorded)
        ):
            raise DataError(
                f"{self.path}: its checksum metadata is malformed ({str(self.checksum)[:200]}); "
                "delete it and rerun the activations rule"
            )
        if [r[0] for r in recorded] != self._row_group_rows:
            raise DataError(
                f"{self.path}: has {self.num_row_groups} row groups of {self._row_group_rows[:8]}"
                f"{'...' if self.num_row_groups > 8 else ''} rows, its checksum records "
                f"{len(recorded)} of {[r[0] for r in recorded][:8]}"
                f"{'...' if len(recorded) > 8 else ''}; the file is corrupt: delete it and rerun "
                "the activations rule"
            )
        started = time.perf_counter()

        def digest(i: int) -> str:
            return row_group_digest(self._read_table(i, self.columns))

        threads = threads or min(4, os.cpu_count() or 1, max(1, self.num_row_groups))
        pool = ThreadPoolExecutor(threads, thread_name_prefix=f"verify {self.path.name}")
        try:  # in order: the first row group that differs (or is unreadable) is the one named
            results = pool.map(digest, range(self.num_row_groups))
            for i, (found, (rows, expected)) in enumerate(zip(results, recorded, strict=True)):
                if found != expected:
                    last = self._row_starts[i] + rows - 1
                    raise DataError(
                        f"{self.path}: row group {i} of {self.num_row_groups} (rows "
                        f"{self._row_starts[i]} to {last}) does not match the checksum recorded "
                        f"when it was written (sha256 {expected}, found {found}); the file is "
                        "corrupt: delete it and rerun the activations rule"
                    )
        finally:
            pool.shutdown(cancel_futures=True)  # after an error: no need to read the rest
        self.verified = True
        log.info(
            "%s: checksum of %d row groups verified in %.1f s",
            self.path,
            self.num_row_groups,
            time.perf_counter() - started,
        )

    def _parquet(self) -> pq.ParquetFile:
        """This thread's reader: sharing one ParquetFile across threads is not documented as safe.

        They all read one memory map (Arrow's reads at an offset are thread-safe), so the pages of
        the file are mapped once, not once per thread.
        """
        if not hasattr(self._local, "file"):
            self._local.file = self._reader(self._file.metadata)
        return self._local.file

    def _reader(self, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        """A ParquetFile over the memory map, for the scalar columns, `verify`, and vector columns
        that cannot be read in place (`_page_layout`). It reads the pages as zero-copy slices of
        the map, then decodes each into a buffer of its own.

        Not pa.memory_map: Arrow's memory-mapped file advises the kernel of every read (madvise
        WILLNEED, a walk over the page cache), and pre_buffer caches the column chunks first; for
        a file mapped in memory both only add work. Measured on 8 MiB row groups of float16: 0.4 ms
        to decode one this way, 0.7-1.4 ms through pa.memory_map with pre_buffer.
        """
        return pq.ParquetFile(pa.BufferReader(self._source), metadata=metadata, pre_buffer=False)

    def input_scale(self, scheme: str) -> float:
        """The factor the trainer multiplies inputs by (see TrainingConfig.input_scaling)."""
        norm = self.metadata["norm"]
        if scheme == "expected_norm":  # E|x| = sqrt(d)  (SAELens expected_average_only_in)
            return self.d_model**0.5 / norm["mean_norm"]
        if scheme == "centred":  # E|x - E x|^2 = d: unit variance per dimension on average
            return (self.d_model / norm["centred_mean_squared_norm"]) ** 0.5
        return 1.0

    def _check_columns(self, columns) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(
                f"{self.path}: has no column(s) {missing}, which an architecture of this study needs; "
                "rerun the activations rule (snakemake --forcerun activations)"
            )

    def read_row_group(self, i: int, columns=("act",)) -> dict[str, np.ndarray]:
        """One row group as arrays ([rows, d] for vector columns), read-only views where possible.

        Vector columns whose values lie in the file as they are (`_page_layout`) are views of the
        mapped file if they fill one data page, else copies of their pages. No Arrow threads:
        they parallelise over columns, and with one column only add hand-offs (measured 1.5x
        slower); `shuffled` decodes several row groups at once instead.
        """
        pages = self._vector_pages(i, columns)
        if not pages:
            return self._arrays(self._read_table(i, columns), columns)
        parts = list(self._iter_pages(i, columns, pages, self._row_group_rows[i]))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self._no_rows(columns)
        return {c: np.concatenate([part[c] for part in parts]) for c in columns}

    def iter_row_group(
        self, i: int, columns=("act",), chunk_bytes: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Row group i as read_row_group's arrays, in consecutive chunks of about `chunk_bytes`
        (default DECODE_CHUNK_BYTES). Vector columns stored as they are (`_page_layout`) come as
        read-only views of the mapped file, no copy made; their chunks end where pages end."""
        chunk_bytes = chunk_bytes or DECODE_CHUNK_BYTES
        row_bytes = sum(
            v.itemsize * int(np.prod(v.shape[1:])) for v in self._no_rows(columns).values()
        )
        rows = max(1, chunk_bytes // row_bytes)
        pages = self._vector_pages(i, columns)
        if pages:
            yield from self._iter_pages(i, columns, pages, rows)
            return
        n_read = 0
        try:
            chunks = self._parquet().iter_batches(
                rows, row_groups=[i], columns=list(columns), use_threads=False
            )
            for chunk in chunks:
                n_read += chunk.num_rows
                yield self._arrays(chunk, columns)
        except (OSError, pa.ArrowException) as e:  # ArrowException: also absurd sizes in a header
            raise self._unreadable(i, e) from None
        self._check_rows(i, n_read)

    def _vector_pages(self, i: int, columns) -> dict[str, _Pages]:
        """{column: its pages} for the vector columns of row group i that can be read in place."""
        if not self._read_pages:
            return {}
        try:
            pages = {c: self._page_layout(i, c) for c in columns if c in self._vectors}
        except CorruptPage as e:
            raise self._unreadable(i, e) from None
        return {c: p for c, p in pages.items() if p is not None}

    def _page_layout(self, i: int, name: str) -> _Pages | None:
        """Where row group i's values of column `name` lie in the mapped file, if they are stored
        as they are (parquet_pages.plain_pages: as the writer stores vectors); None: read them
        through pyarrow. Parsed once per row group and column (its few page headers)."""
        key = (i, name)
        if key not in self._pages:
            j = self._leaf[name]
            chunk = self._file.metadata.row_group(i).column(j)
            column = self._file.metadata.schema.column(j)
            pages = plain_pages(self._bytes, chunk, column, len(self._bytes))
            if pages is not None and sum(rows for _, rows in pages) != self._row_group_rows[i]:
                pages = None
            self._pages[key] = None if pages is None else _Pages(pages, column.length)
        return self._pages[key]

    def _iter_pages(self, i, columns, pages: dict[str, _Pages], chunk_rows: int):
        """Row group i in chunks of at most `chunk_rows` rows: the columns in `pages` as views of
        the mapped file (a chunk never straddles a page of any), the others read with pyarrow
        (whole: they are a few bytes a row) and sliced."""
        rest = [c for c in columns if c not in pages]
        others = self._arrays(self._read_table(i, rest), rest) if rest else {}
        bounds = np.unique(np.concatenate([p.starts for p in pages.values()])).tolist()
        for page_start, page_stop in itertools.pairwise(bounds):
            for start in range(page_start, page_stop, chunk_rows):
                stop = min(start + chunk_rows, page_stop)
                yield {
                    c: pages[c].rows(self._source, start, stop, self._vectors[c])
                    if c in pages
                    else others[c][start:stop]
                    for c in columns
                }

    def _arrays(self, table: pa.Table | pa.RecordBatch, columns) -> dict[str, np.ndarray]:
        out = {}
        for name in columns:
            array = table.column(name)
            if isinstance(array, pa.ChunkedArray):
                array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
            if name in self._vectors:
                out[name] = vector_values(array, self._vectors[name])
            else:
                out[name] = array.to_numpy(zero_copy_only=False)
        return out

    def _read_table(self, i: int, columns) -> pa.Table:
        """Row group i as a Table, on this thread's reader; DataError naming it if unreadable."""
        try:
            table = self._parquet().read_row_group(i, columns=list(columns), use_threads=False)
        except (OSError, pa.ArrowException) as e:  # ArrowException: also absurd sizes in a header
            raise self._unreadable(i, e) from None
        self._check_rows(i, table.num_rows)
        return table

    def _check_rows(self, i: int, n_read: int) -> None:
        """pyarrow skips a data page whose header has an unknown page type, without an error: a
        row group that decodes to fewer rows than the footer records is corrupt."""
        if n_read != self._row_group_rows[i]:
            raise self._unreadable(
                i,
                ValueError(f"{n_read} rows decoded, the footer records {self._row_group_rows[i]}"),
            )

    def _unreadable(self, i: int, e: Exception) -> DataError:
        return DataError(
            f"{self.path}: row group {i} is unreadable ({e}); the file is corrupt: delete it "
            "and rerun the activations rule"
        )

    def batches(self, batch_size: int, columns=("act",)) -> Iterator[dict[str, np.ndarray]]:
        """All rows once, in file order, as dicts of arrays (the last batch may be smaller)."""
        self._check_columns(columns)
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0
        for i in range(self.num_row_groups):
            pending.append(self.read_row_group(i, columns))
            n_pending += len(pending[-1][columns[0]])
            if n_pending >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in columns}
                n_full = n_pending // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    yield {k: v[start : start + batch_size] for k, v in merged.items()}
                pending = [{k: v[n_full:] for k, v in merged.items()}]
                n_pending -= n_full
        if n_pending:
            yield {k: np.concatenate([p[k] for p in pending]) for k in columns}

    def tensors(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All activations once, in file order, as float32 tensors [batch, d_model]."""
        for b in self.batches(batch_size):
            yield torch.from_numpy(b["act"]).float()

    def shuffled(
        self,
        batch_size: int,
        seed: int,
        columns=("act",),
        buffer_row_groups: int = 4,
        prefetch: int = 1,
        decode_threads: int | None = None,
        start_batch: int = 0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches {column: float32 tensor} in a seeded shuffled order, epoch after epoch.

        Row groups come in a seeded random order, `buffer_row_groups` at a time; the rows of each
        buffer (with the previous buffer's leftover) are shuffled and cut into batches. All random
        draws happen in one fixed sequence (`_shuffle_plan`), so the batches depend on the seed
        only, never on thread timing or on how the file happens to be encoded.

        A batch is, per column, one gather of its rows into a fresh tensor and a conversion to
        float32: the work of a gather from a NumPy memmap. Vector columns stored as they are
        (`_page_layout`: as the writer stores them) are gathered straight from the mapped file, a
        row copied once; other columns are first decoded, in file order, into a staging buffer
        (its row groups in parallel on `decode_threads` threads, by default one per row group of a
        buffer up to the CPU count) and gathered from there. A background thread prepares the next
        buffers while the caller computes: it locates the rows and touches their pages, so that a
        file not yet in memory is read from disk ahead, and decodes what must be decoded;
        `prefetch` buffers wait ready in a queue, one more is being prepared; `prefetch=0`
        prepares them on the caller's thread. The gathers stay on the caller's thread, where
        torch's threads run them (measured: on a background thread they take up to 2x longer).

        `start_batch = n` starts at batch n of that sequence (a resumed training run): the buffers
        before it are drawn but not read, see `_shuffled_buffers`.
        """
        self._check_columns(columns)
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        decode_threads = decode_threads or min(buffer_row_groups, os.cpu_count() or 1)
        free: queue.SimpleQueue = queue.SimpleQueue()  # staging buffers whose batches are all out
        buffers = self._shuffled_buffers(
            batch_size, seed, columns, buffer_row_groups, decode_threads, start_batch, free
        )
        if prefetch:
            buffers = _in_background(buffers, prefetch, name=f"read {self.path.name}")
        values = {
            c: (torch.from_numpy(v).dtype, v.shape[1:]) for c, v in self._no_rows(columns).items()
        }
        with contextlib.closing(buffers):  # closing this generator stops the threads at once
            for buffer in buffers:
                for b in range(buffer.start, buffer.stop, batch_size):
                    yield {
                        c: _gathered(rows, index[b : b + batch_size], *values[c])
                        for c, (rows, index) in buffer.sources.items()
                    }
                if buffer.staging is not None:
                    free.put(buffer.staging)

    def _shuffle_plan(
        self, batch_size: int, seed: int, buffer_row_groups: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """The shuffle without the data, endless: (row groups, row permutation, rows cut into
        batches) per buffer. A buffer's rows are the previous buffer's leftover, then its row
        groups' rows; every random draw of `shuffled` is made here, in one fixed sequence."""
        rng = np.random.default_rng(seed)
        n_leftover = 0
        while True:
            groups = rng.permutation(self.num_row_groups)
            for start in range(0, len(groups), buffer_row_groups):
                chunk = groups[start : start + buffer_row_groups]
                n_rows = n_leftover + sum(self._row_group_rows[i] for i in chunk)
                perm = rng.permutation(n_rows)
                n_full = n_rows // batch_size * batch_size
                n_leftover = n_rows - n_full
                yield chunk, perm, n_full

    def _shuffled_buffers(
        self,
        batch_size: int,
        seed: int,
        columns,
        buffer_row_groups: int,
        decode_threads: int,
        start_batch: int = 0,
        free: queue.SimpleQueue | None = None,
    ) -> Iterator[_Buffer]:
        """The buffers of `shuffled`, each ready to be gathered from. `free`: staging to reuse.

        The rows a buffer leaves over (fewer than a batch) go on to the next buffer as their places
        in the file (columns gathered from it) or as a copy of their bytes (staged columns).
        The buffers that lie wholly before batch `start_batch` are skipped without reading them:
        their random draws are made and only the numbers of the rows they leave over are followed,
        so that the first buffer read locates (or reads) those in their row groups, and the
        batches are the ones a stream from batch 0 would give.
        """
        leftover = np.empty(0, dtype=np.int64)  # global row numbers of the rows left over
        leftover_at: dict[str, np.ndarray] = {}  # their byte offsets in the file, per column
        leftover_rows: dict[str, np.ndarray] = {}  # or their bytes, for the columns staged
        # the most rows a buffer holds: a leftover (less than a batch) and its largest row groups
        largest = sorted(self._row_group_rows)[-buffer_row_groups:]
        capacity = batch_size - 1 + sum(largest)
        free = free if free is not None else queue.SimpleQueue()
        with ThreadPoolExecutor(
            decode_threads, thread_name_prefix=f"decode {self.path.name}"
        ) as pool:
            for groups, perm, n_full in self._shuffle_plan(batch_size, seed, buffer_row_groups):
                ids = [np.arange(self._row_starts[g], self._row_starts[g + 1]) for g in groups]
                ids = np.concatenate([leftover, *ids])
                n_batches = n_full // batch_size
                if n_batches <= start_batch:  # wholly before the first batch wanted: not read
                    start_batch -= n_batches
                    leftover, leftover_at, leftover_rows = ids[perm[n_full:]], {}, {}
                    continue
                sources, first = {}, {}  # first: the leftover's bytes, for the columns staged
                for c in columns:
                    before = leftover_at.get(c)
                    if before is None:  # the first buffer read, or the last one staged c
                        before = self._addresses(leftover, c)
                    at = self._addresses_in(groups, c, before)
                    if at is not None:  # gathered from the file
                        sources[c] = (self._file_rows(c), torch.from_numpy(at[perm]))
                    elif c in leftover_rows:
                        first[c] = leftover_rows[c]
                    elif before is not None:
                        first[c] = self._file_rows(c)[torch.from_numpy(before)].numpy()
                    else:
                        first[c] = _row_bytes(self._read_rows(leftover, [c])[c])
                storage = None
                if first:  # staged: decoded into a staging buffer in file order, gathered there
                    storage = self._staging(free, first, capacity)
                    self._stage(groups, first, storage, pool)
                    index = torch.from_numpy(perm)
                    sources |= {c: (torch.from_numpy(storage[c]), index) for c in first}
                leftover = ids[perm[n_full:]]
                leftover_at = {
                    c: at[n_full:].numpy() for c, (_, at) in sources.items() if c not in first
                }
                # copied now: the staging buffer may be reused as soon as its batches are out
                leftover_rows = {c: storage[c][perm[n_full:]] for c in first}
                order = {c: sources[c] for c in columns}  # the caller's column order
                yield _Buffer(order, start_batch * batch_size, n_full, storage)
                start_batch = 0

    def _staging(self, free: queue.SimpleQueue, columns, capacity: int) -> dict[str, np.ndarray]:
        """A staging buffer for these columns, [capacity, bytes per row] uint8 each: a free one
        (the pages of fresh memory cost as much as decoding into them), with any column it lacks."""
        try:
            storage = free.get_nowait()
        except queue.Empty:
            storage = {}
        for c, v in self._no_rows(list(columns)).items():  # the columns staged may change
            if c not in storage:
                storage[c] = np.empty((capacity, _row_bytes(v).shape[1]), np.uint8)
        return storage

    def _row_addresses(self, i: int, column: str) -> np.ndarray | None:
        """The byte offset in the mapped file of each row of row group i's values of a vector
        column, if they lie there as they are (`_page_layout`), else None. Touches one byte of each
        memory page they lie on: a file not in memory yet is read from disk here, ahead of the
        gathers (this runs on the background thread of `shuffled`)."""
        pages = self._vector_pages(i, [column]).get(column)
        if pages is None or sys.byteorder != "little":  # the values are little-endian
            return None
        at = pages.addresses()
        step = mmap.PAGESIZE
        for offset, rows in zip(pages.offsets, np.diff(pages.starts), strict=True):
            self._bytes[offset : offset + int(rows) * pages.width : step].max(initial=0)
        return at

    def _addresses_in(self, groups, column: str, before: np.ndarray | None) -> np.ndarray | None:
        """The byte offsets of the rows `before` (already located), then of the row groups' rows,
        in that order; None if any of them is not stored in place."""
        if before is None:  # a scalar column too: `_addresses` gives None for one
            return None
        parts = [before]
        for g in groups:
            at = self._row_addresses(int(g), column)
            if at is None:
                return None
            parts.append(at)
        return np.concatenate(parts)

    def _addresses(self, ids: np.ndarray, column: str) -> np.ndarray | None:
        """The byte offsets of the rows with these global row numbers, in this order, or None."""
        if column not in self._vectors:
            return None
        out = np.empty(len(ids), dtype=np.int64)
        group_of = np.searchsorted(self._row_starts, ids, side="right") - 1
        for g in np.unique(group_of):
            at = self._row_addresses(int(g), column)
            if at is None:
                return None
            here = group_of == g
            out[here] = at[ids[here] - self._row_starts[g]]
        return out

    def _file_rows(self, column: str) -> torch.Tensor:
        """The mapped file as rows of a vector column's width, one starting at every byte: row
        `offset` is the value stored at that byte offset (a view, never written)."""
        width = self._file.schema_arrow.field(column).type.byte_width
        return self._mapped.as_strided((len(self._mapped) - width + 1, width), (1, 1))

    def _read_rows(self, ids: np.ndarray, columns) -> dict[str, np.ndarray]:
        """The rows with these global row numbers, in this order; reads only the row groups that
        hold them."""
        rows = {
            c: np.empty((len(ids), *v.shape[1:]), v.dtype)
            for c, v in self._no_rows(columns).items()
        }
        group_of = np.searchsorted(self._row_starts, ids, side="right") - 1
        for g in np.unique(group_of):
            part = self.read_row_group(int(g), columns)
            here = group_of == g
            for c in columns:
                rows[c][here] = part[c][ids[here] - self._row_starts[g]]
        return rows

    def _stage(self, groups, first: dict[str, np.ndarray], storage, pool) -> None:
        """Into `storage` (a row's values as bytes), for the columns of `first`: the rows `first`,
        then the row groups' rows, in file order. The row groups are decoded in parallel (in
        chunks: `iter_row_group`), each chunk copied on while it is still in its thread's cache."""
        columns = list(first)
        n_first = len(first[columns[0]])
        offsets = np.cumsum([n_first, *(self._row_group_rows[g] for g in groups)])
        for c, rows in first.items():
            storage[c][:n_first] = rows

        def decode(k: int) -> None:
            start = offsets[k]
            for part in self.iter_row_group(groups[k], columns):
                n = len(part[columns[0]])
                for c in columns:
                    storage[c][start : start + n] = _row_bytes(part[c])
                start += n

        for _ in pool.map(decode, range(len(groups))):  # in order: the first error is raised
            pass

    def _no_rows(self, columns) -> dict[str, np.ndarray]:
        """Empty arrays of the dtypes and shapes that read_row_group returns."""
        out = {}
        for c in columns:
            if c in self._vectors:
                out[c] = np.empty((0, self.d_model), self._vectors[c])
            else:
                out[c] = np.empty(0, self._file.schema_arrow.field(c).type.to_pandas_dtype())
        return out


class _Pages:
    """The data pages of a column chunk whose values are stored as they are: page k holds rows
    starts[k] to starts[k + 1] of its row group, from byte offsets[k] of the file."""

    def __init__(self, pages: list[tuple[int, int]], width: int):
        self.offsets = [offset for offset, _ in pages]
        self.starts = np.cumsum([0, *(rows for _, rows in pages)])
        self.width = width

    def addresses(self) -> np.ndarray:
        """The byte offset in the file of each row of the row group, int64."""
        rows = np.diff(self.starts)
        first = np.asarray(self.offsets, dtype=np.int64) - self.starts[:-1] * self.width
        return np.repeat(first, rows) + np.arange(int(self.starts[-1]), dtype=np.int64) * self.width

    def rows(self, source, start: int, stop: int, dtype: str) -> np.ndarray:
        """Rows start to stop (in one page) as a read-only [rows, d] array of `dtype`, a view."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        if stop > self.starts[k + 1]:
            raise AssertionError(f"rows {start} to {stop} straddle pages at {self.starts}")
        offset = self.offsets[k] + (start - int(self.starts[k])) * self.width
        return _vectors_at(source, offset, stop - start, self.width, dtype)


class _Buffer(NamedTuple):
    """A buffer of `shuffled`: per column (rows, index), batch b being rows.index_select(0,
    index[b : b + batch_size]) for b in range(start, stop, batch_size); `staging`: the arrays
    the staged columns' rows are in, to reuse once the batches are out (None: none staged)."""

    sources: dict[str, tuple[torch.Tensor, torch.Tensor]]
    start: int
    stop: int
    staging: dict[str, np.ndarray] | None


def _gathered(rows: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """Rows `index` of `rows` (a value's bytes each, uint8) as a float32 [len(index), *shape]:
    one gather into a fresh tensor, then the conversion (none for float32: already a copy)."""
    values = rows.index_select(0, index).view(dtype).reshape(len(index), *shape)
    return values.to(torch.float32)


def _row_bytes(a: np.ndarray) -> np.ndarray:
    """An array of rows as a [rows, bytes per row] uint8 array (a view where it can be)."""
    a = np.ascontiguousarray(a)
    return a.reshape(len(a), int(np.prod(a.shape[1:]))).view(np.uint8)


def _in_background(items: Iterator, depth: int, name: str) -> Iterator:
    """Iterate `items` on a daemon thread, at most `depth` items ahead of the consumer.

    An exception in the thread is raised here, in the consumer. Closing this generator (or
    dropping it) stops the thread: it checks `stop` while it waits for room in the queue.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed over, raised by the consumer
            put(e)
        finally:
            items.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


_END = object()  # the end of a finite stream in _in_background


# ---- resources --------------------------------------------------------------------------------------

# What Parquet adds to the raw values, as the writer encodes them (measured with pyarrow 26 at
# d_model 32-512, 240-100k rows; tests/test_resources.py checks the estimate against written files):
_SCALAR_BYTES = 6  # per row and int32/float32 column: 4, plus a dictionary index (measured <= 5.2)
_CHUNK_BYTES = 256  # per row group and column: metadata, page headers, checksum entry (~170)
_FILE_BYTES = 8192  # per file: schema, metadata, provenance (measured 1-3 KB)
_MARGIN = 1.02


def estimate_activation_bytes(
    n_rows: int, d_model: int, extra_columns=(), row_group_rows: int = 8192
) -> int:
    """An upper estimate of the size of an activation file of n_rows rows (tokens kept)."""
    columns = schema(d_model, extra_columns)
    per_row = 0
    for field in columns:
        if isinstance(field.type, pa.FixedSizeBinaryType):  # the values alone: no levels
            per_row += field.type.byte_width
        else:
            per_row += _SCALAR_BYTES
    row_groups = -(-n_rows // row_group_rows)
    overhead = row_groups * len(columns) * _CHUNK_BYTES + _FILE_BYTES
    return int((n_rows * per_row + overhead) * _MARGIN)


def human_bytes(n: float) -> str:
    """Bytes in binary units, as `df -h` shows them: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_free_space(folder: Path, need: int, what: str, advice: str) -> None:
    """ResourceError unless the disk that `folder` is (or will be) on has `need` bytes free."""
    existing = Path(folder).absolute()
    while not existing.exists():  # the folder is made later: the disk of its nearest parent
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ResourceError(
            f"{what} need about {human_bytes(need)} (an estimate), but {human_bytes(free)} is "
            f"free on the disk of {folder}; {advice}. Nothing was written."
        )


def out_of_memory_error(e: torch.OutOfMemoryError, what: str, advice: str) -> ResourceError:
    """A GPU out of memory (CPU allocations fail with other errors) as a ResourceError: what ran
    out, the start of torch's account of the memory, and the config keys to lower."""
    sentences = " ".join(str(e).split()).split(". ")  # one line; torch's message runs long
    return ResourceError(f"{what}: out of GPU memory ({'. '.join(sentences[:3])}); {advice}")


# ---- caching ----------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict:
    """The saedynamics metadata of an activation file, without reading its rows."""
    return json.loads(pq.read_metadata(path).metadata[METADATA_KEY])


def _block_modules(model) -> list:
    """The transformer blocks of a causal LM (GPT-NeoX; GPT-2 and Llama-style as a courtesy)."""
    for path in ("gpt_neox.layers", "transformer.h", "model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise DataError(f"cannot find the transformer blocks of a {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed for the train split."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' was configured but no CUDA device is available")
    return torch.device(device)


def _hidden_size(checkpoint_dir: Path) -> int | None:
    """d_model from the checkpoint's config.json before the model loads; None if unreadable
    (load_model then says what is wrong with the checkpoint)."""
    try:
        return int(read_json(checkpoint_dir / "config.json")["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_outputs(done: list[Path], out_dir: Path, layers) -> None:
    """After a failure: the files this stage put in place, and the folders it left empty, so that
    its outputs are all there or none is (temporary files are removed by ActivationWriter.abort)."""
    for path in done:
        path.unlink(missing_ok=True)
    for folder in [out_dir / f"layer{layer}" for layer in layers] + [out_dir]:
        with contextlib.suppress(OSError):  # not empty, or not there: left alone
            folder.rmdir()


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position [batch, seq]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def cache_activations(
    cfg: ActivationsConfig,
    checkpoint_dir: Path,
    tokens_parquet: Path,
    out_dir: Path,
    provenance: dict | None = None,
    model_cfg=None,
) -> dict[str, float]:
    """Write out_dir/layer<L>/{train,eval}.parquet for every configured layer; return LM eval stats.

    The checkpoint is verified against its manifest first (`checkpoints.load_model`). `model_cfg`
    (the study's model config), if given: the HF cache to fetch a corrupt file again through, and
    the d_model and number of layers the checkpoint must have.

    Extra columns (cfg.extra_columns), per stored token:
      lm_entropy  entropy of the checkpoint's next-token distribution at the position (nats);
      lm_grad     gradient of the summed next-token loss of the window w.r.t. the hooked
                  activation (all later positions' losses, through every later layer).
    """
    from saedynamics.checkpoints import load_model
    from saedynamics.corpus import read_token_sample

    device = resolve_device(cfg.device)
    first = 1 if cfg.drop_first_position else 0
    extras = tuple(cfg.extra_columns)
    # the token sample and the disk space first: cheap to check, where loading the model is not
    samples = {split: read_token_sample(tokens_parquet, split) for split in ("train", "eval")}
    tokens = {split: windows[:, first:].size for split, (_, windows) in samples.items()}
    advice = (
        "free space on that disk, or lower tokens.train_sequences or cache fewer activations.layers"
    )
    d_model = _hidden_size(checkpoint_dir)
    need = 0  # unknown without a config.json: then load_model fails, naming the checkpoint
    if d_model is not None:
        need = len(cfg.layers) * sum(
            estimate_activation_bytes(n, d_model, extras, cfg.row_group_rows)
            for n in tokens.values()
        )
        require_free_space(
            out_dir,
            need,
            f"{out_dir}/layer<L>/{{train,eval}}.parquet for layers {cfg.layers} (train "
            f"{tokens['train']} and eval {tokens['eval']} tokens per layer, d_model {d_model})",
            advice,
        )
    model = load_model(
        checkpoint_dir,
        dtype=getattr(torch, cfg.model_dtype),
        cache_dir=getattr(model_cfg, "cache_dir", None),
    )
    manifest = read_json(checkpoint_dir / MANIFEST)
    blocks = _block_modules(model)
    missing = [layer for layer in cfg.layers if layer >= len(blocks)]
    if missing:
        raise DataError(
            f"{checkpoint_dir}: the model has {len(blocks)} layers; layers {missing} do not exist"
        )
    d_model = model.config.hidden_size
    expected = (model_cfg.d_model, model_cfg.num_layers) if model_cfg is not None else None
    if expected is not None and (d_model, len(blocks)) != expected:
        raise DataError(
            f"{checkpoint_dir}/config.json: the checkpoint has d_model {d_model} and "
            f"{len(blocks)} layers, the config's model.d_model is {model_cfg.d_model} and "
            f"model.num_layers {model_cfg.num_layers}; fix the config or rerun the checkpoint rule"
        )
    model = model.to(device)
    model.requires_grad_(False)
    want_grad = "lm_grad" in extras

    captured: dict[int, torch.Tensor] = {}
    stop_after: list[int | None] = [None]

    def hook(layer):
        def fn(module, args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop_after[0] == layer:
                raise _StopForward

        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in cfg.layers]
    if want_grad:  # a leaf at the embeddings, so that autograd reaches every hooked layer
        handles.append(
            model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: output.detach().requires_grad_(True)
            )
        )
    lm_stats: dict[str, float] = {}
    started, n_tokens = time.perf_counter(), 0
    done: list[Path] = []  # the files put in place so far
    try:
        for split in ("train", "eval"):
            doc_ids, windows = samples[split]
            ctx = windows.shape[1]
            if ctx > model.config.max_position_embeddings:
                raise DataError(
                    f"tokens.context_length {ctx} exceeds the model's max_position_embeddings "
                    f"{model.config.max_position_embeddings}"
                )
            writers = {
                layer: ActivationWriter(
                    out_dir / f"layer{layer}" / f"{split}.parquet",
                    d_model,
                    {
                        "model": manifest.get("repo_id") or "micro",
                        "revision": manifest["revision"],
                        "commit": manifest.get("commit"),
                        "step": manifest["step"],
                        "layer": layer,
                        "hook": f"gpt_neox.layers.{layer}",
                        "hook_point": f"blocks.{layer}.hook_resid_post",
                        "split": split,
                        "dtype": "float16",
                        "context_length": ctx,
                        "first_position": first,
                        "vocab_size": model.config.vocab_size,
                    },
                    cfg.row_group_rows,
                    extras,
                    provenance=provenance,
                    disk_full_advice=f"this step's activations take about {human_bytes(need)} in "
                    f"all: {advice}, then rerun",
                )
                for layer in cfg.layers
            }
            # logits are needed for the eval loss and the extra columns; else stop at the last layer
            stop_after[0] = None if split == "eval" or extras else max(cfg.layers)
            loss_sum, loss_count = 0.0, 0
            try:
                for start in tqdm(
                    range(0, len(windows), cfg.batch_sequences),
                    desc=f"activations {split}",
                    mininterval=5,
                    unit="batch",
                ):
                    ids = torch.from_numpy(
                        windows[start : start + cfg.batch_sequences].astype(np.int64)
                    ).to(device)
                    with torch.set_grad_enabled(want_grad):
                        try:
                            out = model(input_ids=ids)
                        except _StopForward:
                            out = None
                    columns = {}
                    if out is not None:
                        logp = out.logits[:, :-1].float().log_softmax(-1)
                        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
                        loss_sum += nll.sum().item()
                        loss_count += nll.numel()
                        if "lm_entropy" in extras:
                            columns["lm_entropy"] = next_token_entropy(out.logits.detach())
                        if want_grad:
                            grads = torch.autograd.grad(
                                nll.sum(), [captured[layer] for layer in cfg.layers]
                            )
                            grad_of = dict(zip(cfg.layers, grads, strict=True))
                    b = len(ids)
                    n_tokens += ids.numel()
                    pos = np.tile(np.arange(first, ctx, dtype=np.int32), b)
                    docs = np.repeat(doc_ids[start : start + b].astype(np.int32), ctx - first)
                    toks = windows[start : start + b, first:].reshape(-1).astype(np.int32)
                    for layer, writer in writers.items():
                        # unflattened slices: the writer's float16 conversion makes the one copy
                        per_layer = {name: v[:, first:] for name, v in columns.items()}
                        if want_grad:
                            per_layer["lm_grad"] = grad_of[layer][:, first:]
                        writer.append(docs, pos, toks, captured[layer][:, first:], **per_layer)
                    captured.clear()
                if split == "eval":
                    lm_stats = {"lm_eval_loss": loss_sum / loss_count, "lm_eval_tokens": loss_count}
                for writer in writers.values():
                    writer.metadata.update(lm_stats if split == "eval" else {})
                    writer.close()
                    done.append(writer.path)
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                raise
    except BaseException as e:
        _remove_outputs(done, out_dir, cfg.layers)
        if isinstance(e, torch.OutOfMemoryError):
            raise out_of_memory_error(
                e,
                f"{checkpoint_dir}: caching activations in batches of activations.batch_sequences "
                f"{cfg.batch_sequences}",
                "lower activations.batch_sequences. Nothing was written",
            ) from None
        raise
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - started
    log.info(
        "step %s: %d tokens x %d layers in %.1f s (%.0f tokens/s); LM eval loss %.4f",
        manifest["step"],
        n_tokens,
        len(cfg.layers),
        seconds,
        n_tokens / seconds,
        lm_stats["lm_eval_loss"],
    )
    return lm_stats
