"""Resume checkpoints of a train job: a killed or preempted job continues where it stopped.

The train rule passes results/<study>/resume/step<s>/layer<l>/<set>/ as the resume folder: outside
the rule's outputs, which Snakemake deletes when a job fails. Every `training.checkpoint_tokens`
tokens the trainer writes one file there, `checkpoint.safetensors`, to a temporary sibling that is
fsynced and renamed into place, so that a kill at any moment leaves the previous checkpoint or the
new one, never part of one. It holds, for every SAE of the job (architecture and seed), its
state_dict and `resume_state()` (state an architecture keeps outside its state_dict: counters,
generator states), Adam's per-parameter state, the lr-schedule position and the loss curve so far;
and the torch RNG states and the number of batches consumed, from which the source (sources.py,
`batches(start=...)`) continues the same batch sequence without reading the skipped part. Tensors
are safetensors; the rest is one JSON document in the file's header; nothing is pickled.

A restarted job resumes only from a checkpoint whose fingerprint (settings, architectures,
identity, the source's fingerprint (an activation file's size and mtime), device, code version) is
its own; any other is deleted with a log line. On CPU the SAEs it ends with are bitwise those of an
uninterrupted run (tests/test_resume.py kills real jobs to check). The folder is deleted once the
SAEs are written; cfg.json records the token counts the run resumed from.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from saedynamics.artifacts import atomic_file, provenance_metadata
from saedynamics.errors import DataError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"  # in the resume folder
CHECKPOINT_KEY = "saedynamics.checkpoint"  # its JSON part, in the safetensors header
CHECKPOINT_FORMAT = 2  # bump when what a checkpoint holds changes: older ones are then discarded


def fingerprint(training, architectures, source, device, identity, provenance) -> dict:
    """What a checkpoint belongs to: a job resumes only from a checkpoint with its own fingerprint.

    Not the thread count or the checkpoint interval, which do not change what is trained (the
    thread count may change the last bits of CPU results: resuming stays correct, not bitwise).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "architectures": {name: a.model_dump(mode="json") for name, a in architectures.items()},
        "training": training.model_dump(mode="json", exclude={"threads", "checkpoint_tokens"}),
        "activations": source.fingerprint(),
        "device": device.type,
        "code": {k: provenance.get(k) for k in ("package_version", "git_commit")},
    }


@dataclass
class Resumed:
    """Where a restarted job stands: batches done, earlier resume points, each SAE's
    resume_state (handed to SAE.load_resume_state once the replayed batches are read)."""

    batches_done: int = 0
    resumed_from_tokens: list[int] = field(default_factory=list)
    states: dict[tuple[str, int], dict] = field(default_factory=dict)


class Checkpoints:
    """The resume checkpoints of one train job, in `folder` (None: no checkpoints at all)."""

    def __init__(self, folder: Path | None, fingerprint: dict, every_steps: int, batch_size: int):
        self.path = None if folder is None else Path(folder) / CHECKPOINT
        self.fingerprint = fingerprint
        self.every_steps = every_steps
        self.batch_size = batch_size
        if self.path is not None:
            remove_stale_temporaries(self.path)

    def load(self, saes, optimizers, schedules, curves) -> Resumed:
        """Restore the last checkpoint into the freshly built SAEs, optimisers, schedules and
        loss curves, if there is one of this job; else leave them and start at batch 0."""
        found = None if self.path is None else self._read()
        if found is None:
            return Resumed()
        header, tensors = found
        states = _restore(self.path, header, tensors, saes, optimizers, schedules, curves)
        done = header["batches_done"]
        log.info("resuming from %s: %d batches done (%d tokens)", self.path, done,
                 done * self.batch_size)  # fmt: skip
        return Resumed(done, [*header["resumed_from_tokens"], done * self.batch_size], states)

    def due(self, batches_done: int, n_steps: int) -> bool:
        """Whether a checkpoint is written after `batches_done` optimiser steps of `n_steps`: the
        trainer asks after every step (tests/kill_at.py kills a job at a step through it)."""
        return (
            self.path is not None
            and batches_done % self.every_steps == 0
            and batches_done < n_steps
        )

    def save(self, batches_done, resumed, saes, optimizers, schedules, curves, provenance) -> None:
        """One file: the tensors, and the rest as JSON in its header; renamed into place when
        complete."""
        started = time.perf_counter()
        header = {
            "fingerprint": self.fingerprint,
            "batches_done": batches_done,
            "tokens_done": batches_done * self.batch_size,
            "resumed_from_tokens": resumed.resumed_from_tokens,
        }
        tensors = {"rng/torch": torch.get_rng_state()}
        if any(sae.W_dec.is_cuda for sae in saes.values()):
            tensors |= {f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        per_sae = {}
        for (name, seed), sae in saes.items():
            key = f"{name}/seed{seed}"
            tensors |= {f"{key}/module/{k}": v for k, v in sae.state_dict().items()}
            adam = optimizers[name, seed].state_dict()
            for j, state in adam["state"].items():
                tensors |= {f"{key}/adam/{j}/{k}": v for k, v in state.items()}
            extra = sae.resume_state()
            tensors |= {f"{key}/sae/{k}": v for k, v in extra.items() if torch.is_tensor(v)}
            per_sae[key] = {
                "lr": [group["lr"] for group in adam["param_groups"]],  # the rest is the config's
                "schedule": schedules[name, seed].state_dict(),
                "sae": {k: v for k, v in extra.items() if not torch.is_tensor(v)},
                "curve": curves[name, seed],
            }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {
            CHECKPOINT_KEY: json.dumps({**header, "saes": per_sae}),
            **provenance_metadata(provenance),
        }
        with atomic_file(self.path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
            fd = os.open(tmp, os.O_RDONLY)
            try:  # on disk before the rename: a crashed node must not leave a renamed empty file
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("checkpoint after %d tokens: %s (%.1f MB in %.2f s)", header["tokens_done"],
                 self.path, self.path.stat().st_size / 1e6, time.perf_counter() - started)  # fmt: skip

    def finished(self) -> None:
        """The SAEs are in place: nothing left to resume."""
        if self.path is not None and self.path.parent.exists():
            shutil.rmtree(self.path.parent)

    def _read(self) -> tuple[dict, dict] | None:
        """(JSON header, tensors) of the checkpoint if it is this job's; a checkpoint of other
        settings or an unreadable file is deleted (with a log line): training starts afresh."""
        path = self.path
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as f:  # the header alone, first
                header = json.loads(f.metadata()[CHECKPOINT_KEY])
            theirs = header["fingerprint"]
            if theirs == self.fingerprint:
                return header, load_file(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            log.warning("%s: unreadable checkpoint (%s), deleted; training starts afresh", path, e)
            path.unlink()
            return None
        ours = self.fingerprint
        changed = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        log.info("%s: a checkpoint of other settings (%s differ), deleted; training starts afresh",
                 path, ", ".join(changed))  # fmt: skip
        path.unlink()
        return None


def _restore(path, header, tensors, saes, optimizers, schedules, curves) -> dict[int, dict]:
    """Load a checkpoint into the SAEs, optimisers, schedules and loss curves; return each SAE's
    resume_state."""
    try:
        torch.set_rng_state(tensors["rng/torch"])
        cuda = {int(k.rsplit("/", 1)[1]): v for k, v in _under(tensors, "rng/cuda/").items()}
        if cuda:
            torch.cuda.set_rng_state_all([cuda[i] for i in range(len(cuda))])
        states = {}
        for (name, seed), sae in saes.items():
            key = f"{name}/seed{seed}"
            doc = header["saes"][key]
            sae.load_state_dict(_under(tensors, f"{key}/module/"))
            adam = defaultdict(dict)
            for k, v in _under(tensors, f"{key}/adam/").items():
                j, moment = k.split("/")
                adam[int(j)][moment] = v
            groups = optimizers[name, seed].state_dict()["param_groups"]
            for group, lr in zip(groups, doc["lr"], strict=True):
                group["lr"] = lr
            optimizers[name, seed].load_state_dict({"state": dict(adam), "param_groups": groups})
            schedules[name, seed].load_state_dict(doc["schedule"])
            curves[name, seed] = doc["curve"]
            states[name, seed] = {**doc["sae"], **_under(tensors, f"{key}/sae/")}
    except (KeyError, ValueError, RuntimeError) as e:
        raise DataError(
            f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e}); delete it to "
            "train afresh"
        ) from e
    return states


def _under(tensors: dict, prefix: str) -> dict:
    """The entries whose key starts with `prefix`, the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed earlier run of this job left of its atomic writes of `path`
    (artifacts.atomic_file / atomic_directory temporaries, `.<name>.<8 random chars>.tmp`)."""
    for tmp in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.????????.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
