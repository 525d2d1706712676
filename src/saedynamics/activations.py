"""Activation files: Parquet, written and read with pyarrow.

Columns: doc_id, pos, token_id (int32), act (fixed_size_list<float16>[d_model]), and the extra
columns an architecture requires (config.EXTRA_COLUMNS): lm_entropy float32, lm_grad
fixed_size_list<float32>[d_model]. Plain Arrow lists (not the fixed-shape tensor extension, which
`datasets` 5 refuses): pandas and `datasets` read them as numbers (README, Outputs). Footer
metadata, key "saedynamics" (JSON): format_version, d_model, model, revision, step, layer, hook,
..., `norm` (scaling.NormStatistics of the stored values) and, in eval files, the LM's eval loss.
Every page carries Parquet's own CRC32, checked on every read; `ActivationFile` reads the whole file
once as it opens it, so that a corrupt file fails before any compute, naming its row group.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saedynamics.artifacts import atomic_file, provenance_metadata
from saedynamics.config import EXTRA_COLUMNS
from saedynamics.errors import DataError, ResourceError
from saedynamics.scaling import NormStatistics

METADATA_KEY = b"saedynamics"
FORMAT_VERSION = 3  # 2: vectors as fixed_size_binary, 1: as nullable lists
RERUN = "rerun the activations rule (snakemake --forcerun activations)"
SCALARS = ("doc_id", "pos", "token_id", "lm_entropy")  # zstd + dictionary; vectors stored plain


def schema(d_model: int, extra_columns=()) -> pa.Schema:
    def vector(dtype):  # non-null items: Parquet stores no definition levels for them
        return pa.list_(pa.field("element", dtype, nullable=False), d_model)

    types = dict.fromkeys(("doc_id", "pos", "token_id"), pa.int32())
    types |= {
        "act": vector(pa.float16()),
        "lm_grad": vector(pa.float32()),
        "lm_entropy": pa.float32(),
    }
    names = ("doc_id", "pos", "token_id", "act", *extra_columns)
    return pa.schema([pa.field(name, types[name], nullable=False) for name in names])


class ActivationWriter:
    """Rows appended in any chunks, written in row groups of `row_group_rows`, renamed into place
    by `close()` (deleted by `discard()`); a full disk is a ResourceError naming the file."""

    def __init__(self, path, d_model: int, metadata: dict, row_group_rows: int = 8192,
                 extra_columns=(), provenance: dict | None = None,
                 disk_full_advice: str = "free space there and rerun"):  # fmt: skip
        self.path, self.d_model, self.row_group_rows = Path(path), d_model, row_group_rows
        self.schema = schema(d_model, extra_columns)
        self.metadata = {"format_version": FORMAT_VERSION, **metadata, "d_model": d_model}
        self.provenance, self.advice = provenance or {}, disk_full_advice
        self.norm = NormStatistics(d_model)
        self._atomic = atomic_file(self.path)
        self._writer = pq.ParquetWriter(
            self._atomic.__enter__(),
            self.schema,
            compression={c: "zstd" if c in SCALARS else "none" for c in self.schema.names},
            use_dictionary=list(SCALARS),
            write_statistics=list(SCALARS),
            write_page_checksum=True,
        )
        self._pending: list[pa.RecordBatch] = []
        self.n_rows = 0  # written so far

    def append(self, doc_id, pos, token_id, act: torch.Tensor, **extras: torch.Tensor) -> None:
        """Add rows; `act` and the extras [..., d_model] / [...] on any device, in any dtype."""
        if {"act", *extras} != set(self.schema.names[3:]):
            raise ValueError(f"append() got {sorted(extras)} besides act; {self.schema.names}")
        half = act.detach().to(torch.float16).reshape(-1, self.d_model)  # the copy off a GPU: half
        try:
            self.norm.add(half)  # the statistics of exactly the stored values
        except DataError as e:
            raise DataError(f"{self.path}: {e}; the checkpoint or model_dtype is broken") from None
        arrays = [pa.array(np.asarray(v), pa.int32()) for v in (doc_id, pos, token_id)]
        for name, value in {"act": half, **extras}.items():
            kind = self.schema.field(name).type
            flat = value.detach().to(half.dtype if name == "act" else torch.float32)
            flat = pa.array(flat.cpu().numpy().reshape(-1))
            arrays.append(
                flat if name in SCALARS else pa.FixedSizeListArray.from_arrays(flat, type=kind)
            )
        self._pending.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        if sum(len(b) for b in self._pending) >= self.row_group_rows:
            self._write(whole_row_groups=True)

    def _write(self, whole_row_groups: bool) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        n = table.num_rows - (table.num_rows % self.row_group_rows if whole_row_groups else 0)
        if n == 0:  # pyarrow would write an empty row group
            return
        with self._disk_full_named():
            self._writer.write_table(table.slice(0, n), row_group_size=self.row_group_rows)
        self._pending = table.slice(n).to_batches()
        self.n_rows += n

    @contextlib.contextmanager
    def _disk_full_named(self):
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceError(
                f"{self.path}: {os.strerror(e.errno)} while writing it (the partial file is "
                f"deleted); {self.advice}"
            ) from None

    def close(self) -> dict:
        self._write(whole_row_groups=False)
        if self.n_rows == 0:
            raise DataError(f"{self.path}: no activations to write")
        self.metadata["norm"] = self.norm.result()
        footer = {METADATA_KEY: json.dumps(self.metadata)} | provenance_metadata(self.provenance)
        self._writer.add_key_value_metadata(footer)
        with self._disk_full_named():
            self._writer.close()  # the footer: written in place, as the pages were
        self._atomic.__exit__(None, None, None)
        self._writer = None
        return self.metadata

    def discard(self) -> None:
        """Delete what this writer wrote: its temporary file, or the file once closed."""
        if self._writer is None:
            self.path.unlink(missing_ok=True)
            return
        with contextlib.suppress(Exception):  # the file is discarded: its errors do not matter
            self._writer.close()
        self._writer = None
        self._atomic.__exit__(RuntimeError, RuntimeError("discarded"), None)


def read_metadata(path: str | Path) -> dict:
    """The saedynamics metadata of an activation file, without reading its rows."""
    return json.loads(pq.read_metadata(path).metadata[METADATA_KEY])


class ActivationFile:
    """One activation file, checked as it opens: its format, its columns and (`verify`) every page
    against its checksum. Anything wrong is a DataError naming the file and the rule to rerun."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path, page_checksum_verification=True)
            self.metadata = json.loads(self._file.metadata.metadata[METADATA_KEY])
            found = self.metadata.get("format_version")
        except FileNotFoundError:
            raise DataError(
                f"{self.path}: no such activation file; run the activations rule"
            ) from None
        except (OSError, pa.ArrowException, AttributeError, KeyError, TypeError, ValueError) as e:
            why = f"{type(e).__name__}: {' '.join(str(e).split())}"
            raise DataError(
                f"{self.path}: not a readable activation file ({why}); {RERUN}"
            ) from None
        if found != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: written in activation format {found}, this saedynamics reads "
                f"format {FORMAT_VERSION} (vectors as lists of numbers); {RERUN}"
            )
        schema_ = self._file.schema_arrow
        self.d_model, self.columns = self.metadata.get("d_model"), schema_.names
        extras = [c for c in self.columns[4:] if c in EXTRA_COLUMNS]
        if not isinstance(self.d_model, int) or not schema_.equals(schema(self.d_model, extras)):
            have = [f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in schema_]
            raise DataError(
                f"{self.path}: its columns are {', '.join(have)} (metadata d_model "
                f"{self.d_model!r}), not those an activation file has; {RERUN}"
            )
        self.norm = self.metadata.get("norm")
        if not isinstance(self.norm, dict):
            raise DataError(f"{self.path}: its metadata has no norm statistics; {RERUN}")
        meta, self.n_rows = self._file.metadata, self._file.metadata.num_rows
        self.row_group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.verified = False
        if verify:
            self.verify()

    def verify(self) -> None:
        """Read every page once (Parquet checks each against its CRC32)."""
        for _ in self._row_groups(range(len(self.row_group_rows)), self.columns):
            pass
        self.verified = True

    def read_row_groups(self, ids, columns=("act",)) -> dict[str, np.ndarray]:
        """Row groups `ids`, concatenated in that order, as arrays ([rows, d] for vectors)."""
        if missing := [c for c in columns if c not in self.columns]:
            raise DataError(f"{self.path}: has no column(s) {missing}, which an SAE needs; {RERUN}")
        ids = list(ids)
        starts = np.cumsum([0, *(self.row_group_rows[i] for i in ids)])
        out = {}
        for k, part in enumerate(self._row_groups(ids, columns)):  # into place: no second copy
            for name, values in part.items():
                if name not in out:
                    out[name] = np.empty((starts[-1], *values.shape[1:]), values.dtype)
                out[name][starts[k] : starts[k + 1]] = values
        return out

    def _row_groups(self, ids, columns):
        """Each row group's arrays, in order, decoded on a few threads: pyarrow decodes one row
        group's list column on one thread (a reader per thread, sharing the parsed footer)."""

        def decode(i: int) -> dict[str, np.ndarray]:
            where = f"{self.path}: row group {i} of {len(self.row_group_rows)}"
            try:
                reader = pq.ParquetFile(
                    self.path, metadata=self._file.metadata, page_checksum_verification=True
                )
                table = reader.read_row_group(i, columns=list(columns), use_threads=False)
            except (OSError, pa.ArrowException) as e:
                why = " ".join(str(e).split())
                raise DataError(
                    f"{where} is corrupt ({why}); delete the file and {RERUN}"
                ) from None
            if table.num_rows != self.row_group_rows[i]:  # pyarrow skips pages of unknown types
                raise DataError(f"{where} decodes short of its row count: corrupt; {RERUN}")
            return {c: _numpy(table.column(c), self.d_model) for c in columns}

        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            yield from pool.map(decode, ids)

    def read(self, columns=("act",)) -> dict[str, np.ndarray]:
        """The whole file as arrays."""
        return self.read_row_groups(range(len(self.row_group_rows)), columns)


def _numpy(column: pa.ChunkedArray, d_model: int) -> np.ndarray:
    values = column.combine_chunks()
    if isinstance(values.type, pa.FixedSizeListType):
        return values.flatten().to_numpy().reshape(len(values), d_model)
    return values.to_numpy()
