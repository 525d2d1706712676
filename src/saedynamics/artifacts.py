"""Writing results safely: atomic files and directories, hashes, provenance.

Every stage writes through these helpers, so that a crash, a kill or a full disk never leaves a file
that a later run could mistake for a result: content goes to a temporary sibling first and is
renamed into place only when complete (rename is atomic within one filesystem).

Every artifact records what produced it (`provenance`: config hash, package version, git commit,
container image) in its own metadata, one encoding per format, written only here:

| format | where |
|---|---|
| JSON | top-level key "provenance" |
| Parquet | footer key-value metadata "saedynamics.provenance" (JSON) |
| safetensors | header metadata "saedynamics.provenance" (JSON) |
| PNG | tEXt chunk "saedynamics.provenance" (JSON) |
| PDF, SVG | info dict "Subject" / Dublin Core "description": {"saedynamics.provenance": ...} |
| directory (tokenizer, checkpoint) | its manifest.json, key "provenance" |

The tests read every encoding back (tests/provenance_check.py, `read_provenance`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saedynamics import __version__

PROVENANCE_FIELDS = ("config_hash", "package_version", "git_commit", "container")
PROVENANCE_KEY = "saedynamics.provenance"  # in formats whose metadata is a str -> str mapping
MANIFEST = "manifest.json"  # a directory artifact's description, provenance included
# set by the Snakefile on the submitting host: jobs in a container or on a cluster node may have no
# git, or a git that refuses the mounted checkout ("dubious ownership")
GIT_COMMIT_ENV = "SAEDYNAMICS_GIT_COMMIT"
# savefig metadata keys that matplotlib writes without warning and that hold free text
_FIGURE_TEXT_KEY = {"pdf": "Subject", "svg": "Description"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any, provenance: dict[str, Any] | None = None) -> None:
    """Write `obj` as indented JSON, atomically; with `provenance` as its top-level "provenance"."""
    if provenance is not None:
        if "provenance" in obj:
            raise ValueError(f"{path}: the document already has a 'provenance' key")
        obj = {**obj, "provenance": provenance}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def provenance_metadata(provenance: dict[str, Any]) -> dict[str, str]:
    """Provenance as one str -> str entry: for Parquet footers, safetensors headers, PNG tEXt."""
    return {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}


def write_parquet(
    path: str | os.PathLike, table, provenance: dict[str, Any] | None, **options: Any
) -> None:
    """Write a pyarrow Table atomically, its schema metadata kept and provenance added to it."""
    import pyarrow.parquet as pq

    if provenance is not None:
        metadata = {**(table.schema.metadata or {}), **provenance_metadata(provenance)}
        table = table.replace_schema_metadata(metadata)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **options)


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    provenance: dict[str, Any] | None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write torch tensors as safetensors atomically, with `metadata` and provenance in the header."""
    from safetensors.torch import save_file

    header = {
        **(metadata or {}),
        **(provenance_metadata(provenance) if provenance is not None else {}),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=header or None)
        if len(header) > 1:  # written in a random order: sorted, the bytes are reproducible
            reorder_safetensors_metadata(tmp, sorted(header))


def reorder_safetensors_metadata(path: str | os.PathLike, keys: list[str]) -> None:
    """Rewrite, in place, the header metadata of safetensors file `path` in the order `keys`.

    safetensors keeps the metadata in a hash map, so the same tensors and metadata give files
    whose headers differ in the order of the metadata alone. Reordering keeps the header's length,
    so only the header is rewritten, never the tensor data.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        if sorted(metadata) != sorted(keys):
            raise ValueError(f"{path}: header metadata has keys {sorted(metadata)}, not {keys}")
        header = {"__metadata__": {k: metadata[k] for k in keys}, **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))  # safetensors pads the header with spaces
        if len(text) != n:
            raise ValueError(f"{path}: reordering its header metadata changed its length")
        f.seek(8)
        f.write(text)


def figure_metadata(fmt: str, provenance: dict[str, Any] | None) -> dict[str, str]:
    """The `metadata` argument of matplotlib's savefig that records provenance in format `fmt`.

    PNG takes any tEXt key; PDF and SVG only their standard keys (PDF warns on others, SVG
    refuses them), so there a free-text one holds {"saedynamics.provenance": ...} as JSON.
    """
    if provenance is None:
        return {}
    if fmt == "png":
        return provenance_metadata(provenance)
    if fmt in _FIGURE_TEXT_KEY:
        return {_FIGURE_TEXT_KEY[fmt]: json.dumps({PROVENANCE_KEY: provenance}, sort_keys=True)}
    raise ValueError(f"no provenance encoding for figures in format {fmt!r}")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def settings_hash(settings: Any) -> str:
    """A stable hash of a JSON-able settings object (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _git(directory: Path, *args: str) -> str | None:
    """stdout of `git args` run in `directory`; None when git is missing or fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def checkout_commit(directory: str | os.PathLike) -> str | None:
    """The commit checked out at `directory`, "<sha>-dirty" when tracked files have uncommitted
    changes; None outside a git checkout, without git, or when git refuses the repository."""
    sha = _git(Path(directory), "rev-parse", "HEAD")
    if not sha:
        return None
    changes = _git(Path(directory), "status", "--porcelain", "--untracked-files=no")
    return f"{sha}-dirty" if changes else sha


@functools.cache
def _package_checkout_commit() -> str | None:
    return checkout_commit(Path(__file__).parent)


def git_commit() -> str | None:
    """The commit this package runs from: $SAEDYNAMICS_GIT_COMMIT when set and non-empty, else
    asked of git (once per process) in the package's own directory; None when unknown."""
    return os.environ.get(GIT_COMMIT_ENV, "").strip() or _package_checkout_commit()


def provenance(settings: Any) -> dict[str, Any]:
    """What produced an artifact: the settings hash, package version, git commit, container image."""
    return {
        "config_hash": settings_hash(settings),
        "package_version": __version__,
        "git_commit": git_commit(),
        "container": os.environ.get("APPTAINER_CONTAINER")
        or os.environ.get("SINGULARITY_CONTAINER"),
    }
