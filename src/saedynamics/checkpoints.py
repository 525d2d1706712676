"""Language-model checkpoints across training: their contract, the Hub source, and integrity.

Each checkpoint is a Hugging Face model directory `checkpoints/step<N>/` (config.json, weights as
safetensors, tokenizer files) plus `manifest.json`: where it came from (repo id, revision, resolved
commit), the sha256 of every file, and `duplicate_of` when its weights are byte-identical to an
earlier step's (Pythia has such steps: EleutherAI/pythia#83, #195, #206). Two sources write it:

- `hub` (here): `huggingface_hub.snapshot_download` at revision `step<N>` into the HF cache, then a
  copy. Old Pythia revisions ship only `pytorch_model.bin`; it is read with
  `torch.load(weights_only=True)` (no code runs) and converted, so downstream stages only ever see
  safetensors.
- `micro` (`micro_lm`): a tiny GPT-NeoX trained here on the study's token sample.

Integrity: every stage that loads a checkpoint goes through `load_model`, which first calls
`verify_checkpoint`: each file the manifest lists is hashed (streamed sha256, a few seconds for
Pythia-1B, far less than loading it) and compared with its recorded digest. A missing or changed
file of a `hub` checkpoint is fetched again once, at the manifest's commit: from the HF cache when
the cached copy still matches the manifest's `source_files` digests, else downloaded anew
(`force_download`), then copied (or converted, for pickled weights) into place atomically, each
file on its own, and everything is checked again. Still wrong, or wrong in a `micro` checkpoint
(which only retraining can rebuild), it raises DataError naming the file and both digests. Files
in the directory that the manifest does not list (e.g. Snakemake's `.snakemake_timestamp`) are
ignored. `load_model` then refuses weights that leave a parameter of the model uninitialised.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from saedynamics.artifacts import (
    MANIFEST,
    atomic_directory,
    atomic_file,
    read_json,
    sha256_file,
    write_json,
    write_safetensors,
)
from saedynamics.config import HubModelConfig
from saedynamics.errors import DataError

log = logging.getLogger(__name__)

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
PICKLED = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


# ---- hub ------------------------------------------------------------------------------------------


def _snapshot(
    repo_id: str,
    revision: str,
    patterns: list[str],
    cache_dir: str | None,
    force_download: bool = False,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=cache_dir,
                force_download=force_download,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise DataError(
            f"cannot get {repo_id} at revision {revision!r} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e})"
        ) from e


def refuse_remote_code(directory: Path) -> None:
    """DataError naming the file when a model directory's config.json or tokenizer_config.json
    asks for code from its repository (an `auto_map`, or a `model_type` Transformers does not
    know). saedynamics never runs such code: `trust_remote_code` is always off, and a repository
    that names its own classes is not loaded with Transformers' stand-ins either."""
    from transformers import CONFIG_MAPPING

    for name in ("config.json", "tokenizer_config.json"):
        try:
            cfg = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader names it
        if not isinstance(cfg, dict):
            continue
        if "auto_map" in cfg:
            classes = cfg["auto_map"].values() if isinstance(cfg["auto_map"], dict) else []
            why = f"its auto_map names classes of the repository's own code ({', '.join(map(str, classes))})"
        elif name == "config.json" and cfg.get("model_type") not in CONFIG_MAPPING:
            why = f"its model_type {cfg.get('model_type')!r} is not a Transformers architecture"
        else:
            continue
        raise DataError(
            f"{directory / name}: {why}; loading it would run code from the model repository, "
            "and saedynamics never runs remote code (trust_remote_code is always off)"
        )


def download_tokenizer(model: HubModelConfig, out_dir: Path) -> dict:
    """Copy the tokenizer files of `model.tokenizer_revision` into `out_dir`; return their origin."""
    snapshot = _snapshot(model.repo_id, model.tokenizer_revision, TOKENIZER_FILES, model.cache_dir)
    refuse_remote_code(snapshot)
    copied = {}
    for name in TOKENIZER_FILES:
        if (snapshot / name).exists():
            shutil.copy2(snapshot / name, out_dir / name)
            copied[name] = sha256_file(out_dir / name)
    if "tokenizer.json" not in copied:
        raise DataError(f"{model.repo_id}@{model.tokenizer_revision} has no tokenizer.json")
    return {
        "repo_id": model.repo_id,
        "revision": model.tokenizer_revision,
        "commit": snapshot.name,
        "files": copied,
    }


def download_checkpoint(
    model: HubModelConfig,
    step: int,
    out_dir: Path,
    earlier: list[Path],
    provenance: dict | None = None,
) -> dict:
    """Fetch one revision, write `out_dir` (model dir + manifest.json) atomically; return the manifest.

    `earlier`: manifests of steps fetched before this one, to detect byte-identical weights.
    `provenance` goes into the manifest (and into the weights where we convert them).
    """
    revision = model.revision.format(step=step)
    snapshot = _snapshot(
        model.repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + SAFETENSORS, model.cache_dir
    )
    weights = sorted(snapshot.glob("model*.safetensors"))
    if not weights:  # old revisions: pickled weights only, read safely and converted below
        snapshot = _snapshot(
            model.repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + PICKLED, model.cache_dir
        )
        weights = sorted(snapshot.glob("pytorch_model*.bin"))
    if not (snapshot / "config.json").exists() or not weights:
        raise DataError(
            f"{model.repo_id}@{revision} (commit {snapshot.name}) has no config.json or weights"
        )
    refuse_remote_code(snapshot)

    patterns = (
        CONFIG_FILES + TOKENIZER_FILES + (PICKLED if weights[0].suffix == ".bin" else SAFETENSORS)
    )
    source_files = {
        p.name: sha256_file(p)
        for p in sorted(snapshot.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    }
    with atomic_directory(out_dir) as tmp:
        for name in source_files:
            if not name.startswith("pytorch_model"):
                shutil.copy2(snapshot / name, tmp / name)
        if weights[0].suffix == ".bin":
            _convert_pickled_weights(weights, tmp / "model.safetensors", provenance)
        manifest = {
            "source": "hub",
            "repo_id": model.repo_id,
            "revision": revision,
            "step": step,
            "commit": snapshot.name,
            "source_files": source_files,
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
            "weights_sha256": weights_sha256(source_files),
        }
        manifest["duplicate_of"] = _duplicate_of(manifest["weights_sha256"], earlier)
        write_json(tmp / MANIFEST, manifest, provenance)
    manifest = read_json(out_dir / MANIFEST)  # as written: with its provenance
    if manifest["duplicate_of"] is not None:
        log.warning("step %d has the same weights as step %d", step, manifest["duplicate_of"])
    return manifest


def _convert_pickled_weights(files: list[Path], out: Path, provenance: dict | None) -> None:
    state = {}
    for f in files:
        if f.name.endswith(".bin"):
            # weights_only=True: tensors and plain containers only, never arbitrary code
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    tensors = {k: v.contiguous().clone() for k, v in state.items()}
    write_safetensors(out, tensors, provenance, metadata={"format": "pt"})


def weights_sha256(file_hashes: dict[str, str]) -> str:
    """One sha256 over the weight files (safetensors or pickled) among `file_hashes` ({file name:
    sha256}): a manifest's `weights_sha256`, equal for two checkpoints exactly when their weights
    are byte-identical."""
    weights = {n: h for n, h in file_hashes.items() if n.endswith((".safetensors", ".bin"))}
    return hashlib.sha256(
        "".join(f"{n}:{h}\n" for n, h in sorted(weights.items())).encode()
    ).hexdigest()


def _duplicate_of(digest: str, earlier: list[Path]) -> int | None:
    for path in earlier:
        other = read_json(path)
        if other["weights_sha256"] == digest:
            return other["duplicate_of"] if other["duplicate_of"] is not None else other["step"]
    return None


# ---- integrity -----------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict:
    """The manifest.json of checkpoint `directory`; DataError naming it if absent or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise DataError(
            f"{directory}: not a checkpoint directory (no {MANIFEST}); run the checkpoint rule "
            "(or micro_lm for the micro suite)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable ({type(e).__name__}: {e}); delete {directory} and rerun the "
            "checkpoint rule"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DataError(
            f"{path}: has no 'files' mapping of file names to sha256 digests; delete {directory} "
            "and rerun the checkpoint rule"
        )
    return manifest


def _mismatches(directory: Path, files: dict[str, str]) -> dict[str, str | None]:
    """{name: actual sha256, None if missing} of the listed files whose digest is not recorded."""
    bad = {}
    for name, expected in sorted(files.items()):
        path = directory / name
        actual = sha256_file(path) if path.is_file() else None
        if actual != expected:
            bad[name] = actual
    return bad


def _describe(files: dict[str, str], bad: dict[str, str | None]) -> str:
    return "; ".join(
        f"{name} is missing (expected sha256 {files[name]})"
        if actual is None
        else f"{name}: expected sha256 {files[name]}, found {actual}"
        for name, actual in bad.items()
    )


def verify_checkpoint(
    directory: str | Path, *, refetch: bool = True, cache_dir: str | None = None
) -> dict:
    """Check every file that checkpoint `directory`'s manifest lists against its sha256; return
    the manifest (module docstring: what is fetched again, and when it fails).

    `refetch`: fetch a hub checkpoint's missing or changed files once (False: fail at once).
    `cache_dir`: the HF cache to fetch through (None: HF_HUB_CACHE, as `model.cache_dir`).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest["files"]
    bad = _mismatches(directory, files)
    if not bad:
        return manifest
    problem = f"{directory}: files differ from the sha256 its {MANIFEST} records: " + _describe(
        files, bad
    )
    if manifest.get("source") != "hub":
        raise DataError(
            f"{problem}. A micro-suite checkpoint cannot be fetched again: delete the checkpoints "
            "and rerun the micro_lm rule (snakemake --forcerun micro_lm)."
        )
    if not refetch:
        raise DataError(f"{problem}. Delete {directory} and rerun the checkpoint rule.")
    log.warning("%s; fetching them again from %s", problem, manifest.get("repo_id"))
    try:
        _refetch(directory, manifest, sorted(bad), cache_dir)
    except DataError as e:
        raise DataError(f"{problem}. Fetching them again failed: {e}") from None
    still = _mismatches(directory, files)
    if still:
        raise DataError(
            f"{directory}: files differ from the sha256 its {MANIFEST} records, even after "
            f"fetching them again from {manifest['repo_id']} at commit {manifest['commit']}: "
            f"{_describe(files, still)}. Delete {directory} and rerun the checkpoint rule."
        )
    log.warning("%s: %s fetched again and verified", directory, ", ".join(sorted(bad)))
    return manifest


def _refetch(directory: Path, manifest: dict, names: list[str], cache_dir: str | None) -> None:
    """Rebuild the files `names` of a hub checkpoint from its source files at the recorded commit,
    as `download_checkpoint` built them, each replacing its file atomically. The source files come
    from the HF cache when they match the manifest's `source_files`, else downloaded anew."""
    sources: dict[str, str] = manifest.get("source_files") or {}
    pickled = sorted(n for n in sources if n.startswith("pytorch_model"))
    needed = set()
    for name in names:
        if name in sources and name not in pickled:
            needed.add(name)
        elif name == "model.safetensors" and pickled:  # converted from the pickled weights
            needed.update(pickled)
        else:
            raise DataError(
                f"{name} is not a file of {manifest.get('repo_id')} that can be fetched"
            )
    repo_id, commit = manifest["repo_id"], manifest["commit"]
    snapshot = _snapshot(repo_id, commit, sorted(needed), cache_dir)
    stale = _mismatches(snapshot, {n: sources[n] for n in needed})
    if stale:  # the cached copy itself is corrupt: download anew
        log.warning(
            "the Hugging Face cache's copy of %s@%s differs: %s; downloading again",
            repo_id,
            commit,
            _describe(sources, stale),
        )
        snapshot = _snapshot(repo_id, commit, sorted(needed), cache_dir, force_download=True)
        stale = _mismatches(snapshot, {n: sources[n] for n in needed})
        if stale:
            raise DataError(
                f"the downloaded copy in {snapshot} differs from the digests recorded at the "
                f"first download too: {_describe(sources, stale)}"
            )
    folder = os.stat(directory)
    for name in names:
        if name in sources and name not in pickled:
            with atomic_file(directory / name) as tmp:
                shutil.copyfile(snapshot / name, tmp)
        else:
            weights = [snapshot / n for n in pickled if n.endswith(".bin")]
            with atomic_file(directory / name) as tmp:
                _convert_pickled_weights(weights, tmp, manifest.get("provenance"))
    # the same content as recorded: keep the directory's time, which Snakemake may compare
    os.utime(directory, ns=(folder.st_atime_ns, folder.st_mtime_ns))


def _first(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_model(directory: str | Path, dtype=None, cache_dir: str | None = None):
    """The causal LM of checkpoint `directory`, verified first (`verify_checkpoint`); DataError
    naming the directory when its weights cannot be loaded or leave parameters uninitialised."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    manifest = verify_checkpoint(directory, cache_dir=cache_dir)
    refuse_remote_code(directory)
    remedy = (
        "rerun the micro_lm rule (snakemake --forcerun micro_lm)"
        if manifest.get("source") == "micro"
        else f"delete {directory} and rerun the checkpoint rule"
    )
    try:  # mismatched sizes reported (and refused below) rather than raised without names
        model, info = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=dtype,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        reason = " ".join(str(e).split())[:1000]  # one line
        raise DataError(
            f"{directory}: cannot load the model ({type(e).__name__}: {reason}); {remedy}"
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(
        f"{key} {list(found)} (config.json implies {list(wanted)})"
        for key, found, wanted in info.get("mismatched_keys") or []
    )
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing: {_first(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} tensors of another shape: {_first(mismatched)}")
        raise DataError(
            f"{directory}: its weights do not fit its config.json ({'; '.join(problems)}); {remedy}"
        )
    return model.eval()
