"""Resumable training: a job killed at any point and restarted ends with the SAEs, bitwise (CPU), of
an uninterrupted run; checkpoints are atomic, belong to their settings, and nothing is unpickled.

saedynamics.resume's module docstring describes the checkpoints; a source's `batches(start=)`
(saedynamics.sources) is the data-order position they restore. A checkpoint holds the whole set of
SAEs a job trains (architectures x seeds); tests/test_training_set.py resumes a set of every
architecture.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saedynamics.activations import ActivationFile
from saedynamics.config import TrainingConfig
from saedynamics.resume import CHECKPOINT, CHECKPOINT_KEY
from saedynamics.saes import REGISTRY, SAE
from saedynamics.sources import FileSource, TensorSource
from saedynamics.training import train_saes

from .kill_at import run
from .synthetic import (
    indexed_activation_file,
    k_if_any,
    organism_tensors,
    record_row_group_reads,
    sparse_dataset,
    stateful_settings,
)

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"study": "t", "step": 0, "layer": 0}
BATCH = 64


# ---- the data-order position ---------------------------------------------------------------------


def row_ids(stream, n: int) -> np.ndarray:
    """The row numbers (first coordinate of the indexed file) of the next n batches."""
    out = [next(stream)["act"][:, 0].numpy().astype(int) for _ in range(n)]
    stream.close()
    return np.stack(out)


@pytest.mark.parametrize("buffer_rows", [3 * 64, 4096])  # read a buffer at a time; kept resident
def test_shuffled_from_start_batch_continues_the_same_sequence(tmp_path, monkeypatch, buffer_rows):
    # 1000 rows in 16 row groups; buffers of 3 row groups (~2 batches) or all of them; ~10.4
    # batches per epoch
    f = indexed_activation_file(tmp_path / "a.parquet", n=1000, d=4, row_group=64)
    source = FileSource(f)
    batch, n = 96, 70

    def stream(start=0):
        return source.batches(batch, ("act",), seed=5, buffer_rows=buffer_rows, start=start)

    fresh = row_ids(stream(), n)
    first_epoch = fresh[:10].ravel()  # 960 of the 1000 rows: shuffled, none twice
    assert len(set(first_epoch)) == 960 and not np.array_equal(first_epoch, np.sort(first_epoch))
    assert not np.array_equal(fresh, row_ids(source.batches(batch, ("act",), 6, buffer_rows), n))
    for k in (1, 2, 3, 10, 11, 12, 31, 64):  # within and across buffers and epochs
        got = row_ids(stream(start=k), n - k)
        assert np.array_equal(got, fresh[k:]), k
    # the same blocks held in memory (TensorSource, which most tests train from): the same sequence
    tensors = {"act": torch.from_numpy(f.read()["act"]).float()}
    in_memory = TensorSource(tensors, block_rows=64).batches(batch, ("act",), 5, buffer_rows)
    assert np.array_equal(row_ids(in_memory, n), fresh)

    # the skipped buffers are not read: only those holding batch 60's rows (a batch spans at most
    # 3 + 1 + 3 row groups here: an epoch ends with a buffer of one), however far it starts
    reads = record_row_group_reads(monkeypatch)
    next(stream(start=60))
    if buffer_rows < f.n_rows:
        assert 3 <= len(reads) <= 7 < 60 * batch // 64
    else:  # resident: read once, whole
        assert sorted(reads) == list(range(len(f.row_group_rows)))
    with pytest.raises(ValueError, match="start"):
        next(stream(start=-1))


# ---- every architecture resumes bitwise ----------------------------------------------------------

# Settings under which each architecture's resume state matters after the resume point at step 16
# of 24 (test_the_resume_state_matters_...): relu_2023 resamples before and after it
# (its init generator and replayed recent inputs), atm masks with probabilities far from 0 (its
# mask generator), adaptivek is in its joint phase (deviation weight, probe-loss window); vsae's
# noise draws are in use at any step. (The BatchTopK family keeps its threshold counters in
# buffers, saved with the weights: it has no resume state to lose.)
STATEFUL = stateful_settings(BATCH)


class Stop(Exception):
    """Ends a training run in-process, as a kill would (the checkpoint written before it stays)."""


def stop_after(steps: int):
    def observe(i, saes):
        if i + 1 == steps:
            raise Stop

    return observe


def small_training(**changes) -> TrainingConfig:
    return TrainingConfig(
        **{
            "n_latents": 64,
            "seeds": [0, 1],
            "train_tokens": 24 * BATCH,
            "batch_size": BATCH,
            "init_tokens": 2 * BATCH,
            "input_scaling": "centred",
            "log_every": 1,
            "checkpoint_tokens": 8 * BATCH,  # checkpoints after 8 and 16 steps
            **changes,
        }
    )


def small_arch(name: str):
    """`name` (a registered architecture) at the settings of STATEFUL, k = 4 where it has a k."""
    cls = REGISTRY[name]
    return cls.Config(architecture=name, **{**k_if_any(name, 4), **STATEFUL.get(name, {})})


def small_run(name: str) -> tuple[TrainingConfig, dict, TensorSource]:
    columns, _ = organism_tensors(n=2048, d=16, m=32, extras=REGISTRY[name].requires)
    return small_training(), {name: small_arch(name)}, TensorSource(columns)


def assert_same_saes(a: Path, b: Path, seeds=(0, 1)) -> None:
    """The SAEs (all tensors of sae_weights.safetensors) and loss curves in a/seed<s>/ and
    b/seed<s>/ are bitwise equal; an AssertionError naming what differs otherwise."""
    for seed in seeds:
        wa = load_file(a / f"seed{seed}" / "sae_weights.safetensors")
        wb = load_file(b / f"seed{seed}" / "sae_weights.safetensors")
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{a.name} seed {seed}: {key} differs"
        curve_a = pq.read_table(a / f"seed{seed}" / "training.parquet")
        curve_b = pq.read_table(b / f"seed{seed}" / "training.parquet")
        assert curve_a.equals(curve_b), f"{a.name} seed {seed}: the loss curves differ"


def record(out: Path, seed: int = 0) -> dict:
    return json.loads((out / f"seed{seed}" / "cfg.json").read_text())["saedynamics"]


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices, and immune to the machine's load
    yield
    torch.set_num_threads(threads)


def stop_and_resume(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(uninterrupted run, run stopped after 20 of 24 steps and resumed from the checkpoint at 16),
    the SAE directories of `name` (seed<s>/ inside)."""
    training, architectures, source = small_run(name)
    train_saes(training, architectures, source, tmp_path / "plain", IDENTITY, {})
    out, resume = tmp_path / "out", tmp_path / "resume"
    with pytest.raises(Stop):
        train_saes(training, architectures, source, out, IDENTITY, {}, stop_after(20), resume)
    assert not (out / name).exists() and (resume / CHECKPOINT).is_file()
    train_saes(training, architectures, source, out, IDENTITY, {}, resume_dir=resume)
    assert not resume.exists()  # deleted once the SAEs are written
    return tmp_path / "plain" / name, out / name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_architecture_resumes_bitwise(tmp_path, name, one_thread):
    plain, resumed = stop_and_resume(tmp_path, name)
    assert_same_saes(plain, resumed)
    assert record(plain)["resumed_from_tokens"] == []
    assert record(resumed)["resumed_from_tokens"] == [16 * BATCH]
    assert record(resumed)["init_seed"] == 0 and record(resumed)["data_seed"] == 0


@pytest.mark.parametrize(
    "name", sorted(n for n, cls in REGISTRY.items() if cls.resume_state is not SAE.resume_state)
)
def test_the_resume_state_matters_where_an_architecture_has_one(
    tmp_path, name, one_thread, monkeypatch
):
    """Resuming without load_resume_state changes the SAEs: the test above sees that state."""
    monkeypatch.setattr(REGISTRY[name], "load_resume_state", lambda self, state, replayed: None)
    plain, resumed = stop_and_resume(tmp_path, name)
    with pytest.raises(AssertionError, match="differs"):
        assert_same_saes(plain, resumed)


def test_checkpoints_of_other_settings_or_unreadable_ones_are_discarded(
    tmp_path, caplog, one_thread
):
    data = tmp_path / "organism.parquet"  # a file: its identity is part of the fingerprint
    sparse_dataset(data, n=2048, d=16, m=32)
    training, resume = small_training(), tmp_path / "resume"
    arch = small_arch("topk")
    other = {"topk": arch.model_copy(update={"lr": 0.01})}

    def source():
        return FileSource(ActivationFile(data))

    def interrupted(architectures) -> None:
        with pytest.raises(Stop):
            train_saes(training, architectures, source(), tmp_path / "x", IDENTITY, {},
                       stop_after(10), resume)  # fmt: skip
        assert (resume / CHECKPOINT).is_file()

    def resumed(out: str, architectures=other) -> Path:
        train_saes(training, architectures, source(), tmp_path / out, IDENTITY, {},
                   resume_dir=resume)  # fmt: skip
        assert not resume.exists()
        return tmp_path / out / "topk"

    train_saes(training, other, source(), tmp_path / "plain", IDENTITY, {})
    interrupted({"topk": arch})
    caplog.set_level("INFO", logger="saedynamics")
    out = resumed("out")
    assert "a checkpoint of other settings (architectures differ), deleted" in caplog.text
    assert_same_saes(tmp_path / "plain" / "topk", out)
    assert record(out)["resumed_from_tokens"] == []

    # so does another set: the checkpoint of topk alone is not resumed by topk and relu together
    interrupted(other)
    caplog.clear()
    resumed("set", {**other, "relu": small_arch("relu")})
    assert "(architectures differ), deleted" in caplog.text
    assert_same_saes(tmp_path / "plain" / "topk", tmp_path / "set" / "topk")

    # a changed activation file (its size or mtime) makes the checkpoint stale too
    interrupted(other)
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1))
    caplog.clear()
    resumed("out2")
    assert "(activations differ), deleted" in caplog.text

    # and the same settings on other data in memory
    interrupted(other)
    columns, _ = organism_tensors(n=2048, d=16, m=32, seed=1)
    caplog.clear()
    train_saes(training, other, TensorSource(columns), tmp_path / "x2", IDENTITY, {},
               resume_dir=resume)  # fmt: skip
    assert "(activations differ), deleted" in caplog.text

    # a file that is not a checkpoint (only a disk fault could leave one: writes are atomic)
    resume.mkdir()
    (resume / CHECKPOINT).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    caplog.clear()
    out3 = resumed("out3")
    assert "unreadable checkpoint" in caplog.text and str(resume / CHECKPOINT) in caplog.text
    assert_same_saes(tmp_path / "out2" / "topk", out3)
    assert record(out3)["resumed_from_tokens"] == []

    # the unchanged job resumes (the checks above are not the whole story)
    interrupted(other)
    caplog.clear()
    out4 = resumed("out4")
    assert "deleted" not in caplog.text and record(out4)["resumed_from_tokens"] == [8 * BATCH]
    assert_same_saes(tmp_path / "out2" / "topk", out4)


# ---- fault injection: SIGKILL the real command and restart it ---------------------------------------

KILL_SEED = 20240607  # the kill points are drawn from this seed (printed by a failing test)
N_STEPS, EVERY = 40, 6  # 40 optimiser steps, a checkpoint every 6: at 6, 12, ..., 36
# Two trials of three kills each, the job restarted after every kill until it completes: kills
# after a random step ("step"), during a random checkpoint's write ("checkpoint": its file written
# but not renamed into place) and during the final write of the SAEs ("output").
TRIALS = (("step", "checkpoint", "step"), ("checkpoint", "step", "output"))


def kill_points(rng: random.Random, kinds) -> list[str]:
    """Strictly increasing kill points, the j-th of m drawn within the j-th m-th of training."""
    bounds = np.linspace(0, N_STEPS, len(kinds) + 1).round().astype(int)
    points = []
    for kind, lo, hi in zip(kinds, bounds[:-1], bounds[1:], strict=True):
        if kind == "step":
            points.append(str(rng.randint(lo + 1, hi)))
        elif kind == "checkpoint":
            points.append(
                f"{rng.choice(range(EVERY * (lo // EVERY + 1), hi, EVERY))}:during-checkpoint"
            )
        else:
            points.append(f"{N_STEPS}:during-output")
    return points


def expected_checkpoint(point: str) -> int:
    """The checkpoint a job killed at `point` leaves: the last one completed before the kill."""
    step, _, phase = point.partition(":")
    last_complete = int(step) - 1 if phase else int(step)  # during a write: not that one
    return min(last_complete, N_STEPS - 1) // EVERY * EVERY  # none is written at the end


# the set the command trains: relu_2023 with its resampling state (replayed inputs, generator) and
# topk beside it; its SAEs land in <out>/<name>/seed<s>/
KILL_SET = {"r": small_arch("relu_2023"), "t": small_arch("topk")}


def train_command(tmp_path: Path, out: Path, resume: Path | None) -> list[str]:
    training = small_training(train_tokens=N_STEPS * BATCH, checkpoint_tokens=EVERY * BATCH)
    settings = {
        "study": "t",
        "training": training.model_dump(mode="json"),
        "architectures": {name: a.model_dump(mode="json") for name, a in KILL_SET.items()},
    }
    command = [sys.executable, "-m", "saedynamics", "train", "--settings", json.dumps(settings)]
    command += ["--threads", "1", "--step", "0", "--layer", "0"]
    command += ["--activations", str(tmp_path / "organism.parquet"), "--out", str(out)]
    return command + (["--resume-dir", str(resume)] if resume else [])


def checkpoint_position(resume: Path) -> int:
    if not (resume / CHECKPOINT).exists():
        return 0
    with safe_open(resume / CHECKPOINT, framework="pt") as f:
        return json.loads(f.metadata()[CHECKPOINT_KEY])["batches_done"]


def test_killed_jobs_resume_to_the_uninterrupted_result(tmp_path):
    sparse_dataset(tmp_path / "organism.parquet", n=2048, d=16, m=32)
    reference = tmp_path / "reference"
    done = run(train_command(tmp_path, reference, None))
    assert done.returncode == 0, done.stderr

    rng = random.Random(KILL_SEED)
    plans = [kill_points(rng, kinds) for kinds in TRIALS]
    for trial, plan in enumerate(plans):
        out, resume = tmp_path / f"out{trial}", tmp_path / f"resume{trial}"
        command, resumed_at, history = train_command(tmp_path, out, resume), 0, []
        for point in [*plan, None]:  # restart after every kill, then once to completion
            job = run(command, point)
            where = f"kill seed {KILL_SEED}, trial {trial} {plan}, run until {point}"
            assert (job.returncode == -9) == (point is not None), f"{where}: {job.stderr[-3000:]}"
            # the restart accepted exactly the last complete checkpoint, never a partial one
            said = re.search(r"resuming from .*: (\d+) batches done", job.stderr)
            assert (int(said[1]) if said else 0) == resumed_at, where
            if resumed_at:
                history.append(resumed_at * BATCH)
            if point is None:
                break
            placed = [name for name in KILL_SET if (out / name).exists()]
            assert placed == [], f"{where}: a partial output was left in place"
            # a write the kill interrupted left its temporary, which the restart must not take
            partial = {
                "during-checkpoint": resume.glob(f".{CHECKPOINT}.*.tmp"),
                "during-output": out.glob(".r.*.tmp"),  # the first architecture's directory
            }.get(point.partition(":")[2], [])
            assert point.isdigit() or list(partial), where
            resumed_at = checkpoint_position(resume)
            assert resumed_at == expected_checkpoint(point), where
        for name in KILL_SET:
            assert_same_saes(reference / name, out / name)
            assert record(out / name)["resumed_from_tokens"] == history
            assert record(out / name)["trained_with"] == sorted(KILL_SET)
        assert not resume.exists()
        assert sorted(p.name for p in out.iterdir()) == sorted(KILL_SET), "temporaries remain"


# ---- nothing is unpickled ---------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
# Old Pythia revisions ship pickled weights only: read there with weights_only=True, converted.
TORCH_LOAD_ALLOWED = {"src/saedynamics/checkpoints.py"}


def unpickling_calls(source: str, name: str) -> list[str]:
    """Where Python `source` (the file `name`, relative to the repository) can unpickle: imports
    of pickle-based modules, pandas' read_pickle, numpy's load with allow_pickle, torch.load
    without weights_only=True or outside TORCH_LOAD_ALLOWED."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            found += [f"{where}: import {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        keywords = {k.arg: getattr(k.value, "value", k.value) for k in node.keywords}
        call = (owner, node.func.attr)
        if node.func.attr == "read_pickle":
            found.append(f"{where}: read_pickle")
        if call in (("np", "load"), ("numpy", "load")) and keywords.get("allow_pickle", False):
            found.append(f"{where}: np.load with allow_pickle")
        safe_load = name in TORCH_LOAD_ALLOWED and keywords.get("weights_only") is True
        if call == ("torch", "load") and not safe_load:
            found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_no_code_path_unpickles():
    files = [p for d in ("src", "tests", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    found = [f for p in files for f in unpickling_calls(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []
    # the scanner finds what it looks for
    bad = (
        "import pickle\nfrom joblib import load\nnp.load(f, allow_pickle=True)\n"
        "df = pd.read_pickle(f)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
    )
    assert len(unpickling_calls(bad, "src/saedynamics/checkpoints.py")) == 6
    assert unpickling_calls("torch.load(f, weights_only=True)", "src/saedynamics/cli.py")
    assert not unpickling_calls("np.load(f, mmap_mode='r')", "benchmarks/activations.py")
    # Snakefiles are not Python: a text search there
    rules = [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]
    pattern = re.compile(r"\bpickle\b|torch\.load|allow_pickle|read_pickle")
    assert [str(p) for p in rules if pattern.search(p.read_text())] == []
