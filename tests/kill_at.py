"""Run `python -m saedynamics ...` and SIGKILL it at a chosen point, as a killed job dies (a test
helper: the kill tests in test_resume.py, test_streaming.py and test_tokens.py).

    python tests/kill_at.py POINT -- train --settings ... --resume-dir ...

POINT is one of
  "<n>"                     after n optimiser steps (and the resume checkpoint there, if one is due)
  "<n>:during-checkpoint"   the resume checkpoint at n written to its temporary file, not yet
                            renamed into place
  "<n>:during-output"       the SAEs written to a temporary directory, not yet renamed into place
                            (n: the job's number of optimiser steps)
  "tokens:<n>"              the tokens stage, after its n-th train shard and the progress after it

Nothing in the package knows about it: before running the command's `__main__` this process wraps
the functions that run at those points (the trainer asks `Checkpoints.due` after every optimiser
step; `Checkpoints.save` writes through resume.atomic_file; the SAEs are written through
training.atomic_directory; the token sample writes each shard with `_Sample.write_shard`) so that
the process sends itself SIGKILL there. A point the job never reaches leaves it running to the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POINT = re.compile(
    r"(?P<step>\d+)(:(?P<phase>during-checkpoint|during-output))?|tokens:(?P<shard>\d+)"
)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Wrap the package's functions so that this process dies at `point`."""
    found = POINT.fullmatch(point)
    if not found:
        raise SystemExit(f"kill_at.py: unknown kill point {point!r} (see its docstring)")
    if found["shard"] is not None:
        _arm_tokens(int(found["shard"]))
    else:
        _arm_training(int(found["step"]), found["phase"])


def _arm_tokens(shard: int) -> None:
    from saedynamics import corpus

    write_shard = corpus._Sample.write_shard

    def wrapped(self) -> None:
        write_shard(self)
        if len(self.shards) == shard:
            die()

    corpus._Sample.write_shard = wrapped


def _arm_training(step: int, phase: str | None) -> None:
    from saedynamics import resume, training

    Checkpoints = resume.Checkpoints
    due, save = Checkpoints.due, Checkpoints.save
    seen = {"n_steps": None, "saving": None, "after_save": False}

    def wrapped_due(self, batches_done: int, n_steps: int) -> bool:
        seen["n_steps"] = n_steps
        answer = due(self, batches_done, n_steps)
        if phase is None and batches_done == step:
            if not answer:  # no checkpoint here: the step is the last thing done
                die()
            seen["after_save"] = True
        return answer

    def wrapped_save(self, batches_done, *args, **kwargs) -> None:
        seen["saving"] = batches_done
        try:
            save(self, batches_done, *args, **kwargs)
        finally:
            seen["saving"] = None
        if seen["after_save"]:
            die()

    atomic_file = resume.atomic_file

    @contextlib.contextmanager
    def wrapped_atomic_file(path):
        with atomic_file(path) as tmp:
            yield tmp
            if phase == "during-checkpoint" and seen["saving"] == step:
                die()  # complete in its temporary file, not renamed into place

    atomic_directory = training.atomic_directory

    @contextlib.contextmanager
    def wrapped_atomic_directory(path):
        with atomic_directory(path) as tmp:
            yield tmp
            if phase == "during-output" and seen["n_steps"] == step:
                die()  # the first architecture's SAEs in their temporary directory

    Checkpoints.due, Checkpoints.save = wrapped_due, wrapped_save
    resume.atomic_file = wrapped_atomic_file
    training.atomic_directory = wrapped_atomic_directory


def command(argv: list[str], kill_at: str | None) -> list[str]:
    """`argv` (`python -m saedynamics ...`) run through this script when `kill_at` is set."""
    if kill_at is None:
        return argv
    assert argv[1:3] == ["-m", "saedynamics"], argv
    return [argv[0], str(Path(__file__).resolve()), kill_at, "--", *argv[3:]]


def run(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m saedynamics ...` from this checkout, killed at `kill_at` (None: not)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SAEDYNAMICS_GIT_COMMIT": "test"}
    return subprocess.run(
        command(argv, kill_at), env=env, capture_output=True, text=True, timeout=300
    )


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit("usage: python tests/kill_at.py POINT -- SAEDYNAMICS_ARGS...")
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # tests/ is not a source of modules for the command
    arm(sys.argv[1])
    sys.argv = ["saedynamics", *sys.argv[3:]]
    runpy.run_module("saedynamics", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
