"""Every artifact of a finished study records what produced it: the check the end-to-end runs call,
and `read_provenance`, which reads each format's encoding (saedynamics/artifacts.py) back.

`assert_every_artifact_has_provenance(results/<study>, container)` walks the study's folder. Files are
artifacts; so are directories whose contents come from third-party writers (the Hugging Face
tokenizer and checkpoint directories) or are a whole (the explorer's static site), which record
provenance in their manifest.json, and whose manifest must then list every file in them. Logs, benchmarks and hidden files (Snakemake's
timestamps, temporary files) are not artifacts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import saedynamics
from saedynamics.artifacts import MANIFEST, PROVENANCE_FIELDS, PROVENANCE_KEY, read_json
from saedynamics.errors import DataError

NOT_ARTIFACTS = {"logs", "benchmarks"}  # top-level folders of job records, not results


def is_directory_artifact(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts in {("tokenizer",), ("explorer",)} or (
        len(parts) == 2 and parts[0] == "checkpoints" and re.fullmatch(r"step\d+", parts[1])
    )


def artifacts(root: Path) -> list[Path]:
    """The artifacts under `root` (a study's results folder), sorted."""
    found = []

    def walk(directory: Path) -> None:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or (directory == root and path.name in NOT_ARTIFACTS):
                continue
            if path.is_dir() and not is_directory_artifact(path, root):
                walk(path)
            else:
                found.append(path)

    walk(root)
    return found


def _problems(path: Path, container: str | None, git_commit: str | None) -> list[str]:
    try:
        provenance = read_provenance(path)
    except DataError as e:
        return [str(e)]
    problems = []
    if set(provenance) != set(PROVENANCE_FIELDS):
        problems.append(f"fields {sorted(provenance)}, expected {sorted(PROVENANCE_FIELDS)}")
    if not re.fullmatch(r"[0-9a-f]{16}", str(provenance.get("config_hash"))):
        problems.append(f"config_hash {provenance.get('config_hash')!r} is not a settings hash")
    if provenance.get("package_version") != saedynamics.__version__:
        problems.append(
            f"package_version {provenance.get('package_version')!r}, "
            f"expected {saedynamics.__version__!r}"
        )
    if not provenance.get("git_commit"):
        problems.append("git_commit is not set")
    elif git_commit is not None and provenance["git_commit"] != git_commit:
        problems.append(f"git_commit {provenance['git_commit']!r}, expected {git_commit!r}")
    if provenance.get("container") != container:
        problems.append(f"container {provenance.get('container')!r}, expected {container!r}")
    if path.is_dir():  # the manifest vouches for the third-party files beside it
        listed = set(read_json(path / MANIFEST).get("files", {}))
        present = {
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        if listed != present:
            problems.append(
                f"{MANIFEST} lists {sorted(listed)}, the directory holds {sorted(present)}"
            )
    return [f"{path}: {p}" for p in problems]


def assert_every_artifact_has_provenance(
    root: Path, container: str | None, git_commit: str | None = None
) -> list[Path]:
    """Assert that every artifact under `root` records provenance with all four fields, this
    package's version, a git commit (`git_commit` if given), and `container` as its image (None:
    not run in one). Returns the artifacts checked."""
    root = Path(root)
    found = artifacts(root)
    assert found, f"{root}: no artifacts"
    problems = [p for path in found for p in _problems(path, container, git_commit)]
    assert not problems, f"{len(problems)} provenance problem(s):\n" + "\n".join(problems)
    return found


# ---- reading provenance back -------------------------------------------------------------------


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance recorded in an artifact: a JSON, Parquet, safetensors, PNG, PDF or SVG file,
    or a directory artifact (its manifest.json). Raises DataError naming the file when it has none
    or cannot be read."""
    path = Path(path)
    readers = {
        ".json": _json_provenance,
        ".parquet": _parquet_provenance,
        ".safetensors": _safetensors_provenance,
        ".png": _png_provenance,
        ".pdf": _pdf_provenance,
        ".svg": _svg_provenance,
        ".html": _html_provenance,
    }
    if path.is_dir():
        path = path / MANIFEST
        if not path.is_file():
            raise DataError(f"{path.parent}: a directory artifact without {MANIFEST}")
    if path.suffix not in readers:
        raise DataError(
            f"{path}: no provenance reader for {path.suffix or 'files without a suffix'}; "
            f"known: {', '.join(readers)} and directories with a {MANIFEST}"
        )
    try:
        found = readers[path.suffix](path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a format's parser means "unreadable"
        raise DataError(f"{path}: cannot read its provenance ({type(e).__name__}: {e})") from e
    if found is None:
        raise DataError(f"{path}: records no saedynamics provenance")
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: its provenance is not valid JSON ({e})") from None
    if not isinstance(found, dict) or not set(PROVENANCE_FIELDS) <= set(found):
        raise DataError(
            f"{path}: its provenance {found!r} lacks one of the fields {', '.join(PROVENANCE_FIELDS)}"
        )
    return found


def _json_provenance(path: Path) -> Any:
    doc = read_json(path)
    return doc.get("provenance") if isinstance(doc, dict) else None


def _parquet_provenance(path: Path) -> str | None:
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path).metadata or {}  # the footer's key-value metadata
    value = metadata.get(PROVENANCE_KEY.encode())
    return None if value is None else value.decode()


def _safetensors_provenance(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return (f.metadata() or {}).get(PROVENANCE_KEY)


def _png_provenance(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        if image.format != "PNG":
            raise DataError(f"{path}: not a PNG image but {image.format}")
        return image.text.get(PROVENANCE_KEY)


def _embedded_provenance(text: str | None) -> Any:
    """The provenance inside the {"saedynamics.provenance": ...} JSON of a PDF or SVG text field."""
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None  # someone else's free text in that field
    return doc.get(PROVENANCE_KEY) if isinstance(doc, dict) else None


def _pdf_provenance(path: Path) -> Any:
    data = path.read_bytes()
    if not data.startswith(b"%PDF-"):
        raise DataError(f"{path}: not a PDF file")
    key = b"/Subject ("  # the info key of artifacts.figure_metadata
    at = data.rfind(key)  # the last one: an incremental update supersedes earlier info dicts
    return None if at < 0 else _embedded_provenance(_pdf_literal_string(data, at + len(key)))


_PDF_ESCAPES = {ord("n"): "\n", ord("r"): "\r", ord("t"): "\t", ord("b"): "\b", ord("f"): "\f"}


def _pdf_literal_string(data: bytes, start: int) -> str:
    """The PDF literal string whose text starts at data[start] (after its opening parenthesis)."""
    out, depth, i = [], 0, start
    while i < len(data):
        c = data[i]
        if c == ord("\\"):
            nxt = data[i + 1]
            if nxt in _PDF_ESCAPES:
                out.append(_PDF_ESCAPES[nxt])
                i += 2
            elif ord("0") <= nxt <= ord("7"):  # octal: up to three digits
                digits = data[i + 1 : i + 4]
                n = len(digits) - len(digits.lstrip(b"01234567"))
                out.append(chr(int(digits[:n], 8)))
                i += 1 + n
            elif nxt in (ord("\n"), ord("\r")):  # a line continuation
                i += 2
            else:
                out.append(chr(nxt))
                i += 2
            continue
        if c == ord("("):
            depth += 1
        elif c == ord(")"):
            if depth == 0:
                return "".join(out)
            depth -= 1
        out.append(chr(c))
        i += 1
    raise ValueError("an unterminated string in the PDF info dictionary")


def _html_provenance(path: Path) -> Any:
    import html

    found = re.search(r'<meta name="saedynamics\.provenance" content="([^"]*)">', path.read_text())
    return None if found is None else html.unescape(found.group(1))


def _svg_provenance(path: Path) -> Any:
    import xml.etree.ElementTree as ET

    description = ET.parse(path).getroot().find(".//{http://purl.org/dc/elements/1.1/}description")
    return _embedded_provenance(None if description is None else description.text)
