"""Every artifact of a finished study records what produced it: the check the end-to-end runs call.

`assert_every_artifact_has_provenance(results/<study>, container)` walks the study's folder. Files are
artifacts; so are directories whose contents come from third-party writers (the Hugging Face
tokenizer and checkpoint directories), which record provenance in their manifest.json, and whose
manifest must then list every file in them. Logs, benchmarks and hidden files (Snakemake's
timestamps, temporary files) are not artifacts.
"""

from __future__ import annotations

import re
from pathlib import Path

import saedynamics
from saedynamics.artifacts import MANIFEST, PROVENANCE_FIELDS, read_json, read_provenance
from saedynamics.errors import DataError

NOT_ARTIFACTS = {"logs", "benchmarks"}  # top-level folders of job records, not results


def is_directory_artifact(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts == ("tokenizer",) or (
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
            p.name for p in path.iterdir() if p.name != MANIFEST and not p.name.startswith(".")
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
