"""Devices, memory and disk: what a job needs, checked before it starts, and errors naming the keys.

Every stage that could run out of something says so in one message naming the amounts and the
config keys that change them (errors.ResourceError), before any work where it can tell in advance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from saedynamics.errors import DataError, ResourceError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' was configured but no CUDA device is available")
    return torch.device(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes a job may still allocate on `device` (free GPU memory; MemAvailable of the host for
    the CPU); None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


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


# What Parquet adds to the values of an activation file, as activations.ActivationWriter encodes
# them (pyarrow 26, d_model 8-512; tests/test_resources.py checks the estimate against files).
_SCALAR_BYTES = 6  # per row and int32/float32 column: 4, plus a dictionary index (measured <= 5.2)
_CHUNK_BYTES = 256  # per row group and column: metadata, page headers and their checksums
_FILE_BYTES = 8192  # per file: schema, metadata, provenance (measured 1-3 KB)


def estimate_activation_bytes(
    n_rows: int, d_model: int, extra_columns=(), row_group_rows: int = 8192
) -> int:
    """An upper estimate of the size of an activation file of n_rows rows."""
    import pyarrow as pa

    from saedynamics.activations import schema

    per_row = 0
    for field in schema(d_model, extra_columns):
        if isinstance(field.type, pa.FixedSizeListType):  # the values, plain, no levels
            per_row += field.type.list_size * field.type.value_type.byte_width
        else:
            per_row += _SCALAR_BYTES
    columns = len(schema(d_model, extra_columns))
    overhead = -(-n_rows // row_group_rows) * columns * _CHUNK_BYTES + _FILE_BYTES
    return int((n_rows * per_row + overhead) * 1.02)
