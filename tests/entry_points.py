"""Run many `python -m <module> ...` commands from one warm interpreter (a test helper).

    python tests/entry_points.py JOBS.json

JOBS.json holds a list of jobs {"argv": [module, arg, ...], "cwd": dir, "log": file}. For each job
this process forks, and the child runs `python -m module arg ...` as the interpreter does (the
module's `__main__` through runpy, exit status from SystemExit, an uncaught exception printed as a
traceback and exit status 1), in `cwd`, with stdout and stderr going to `log`. The exit status of
each job is written back into JOBS.json as "rc".

Why: importing Snakemake takes about 10 s on a small machine (its plugin registry) and importing
torch a few more. Paid once here, a failing `snakemake` or `python -m saedynamics` run costs a
fraction of a second, so the bad-input tests can run every case through both real entry points.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _child(job: dict) -> None:
    os.chdir(job["cwd"])
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = list(job["argv"])
    try:
        runpy.run_module(job["argv"][0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # as the interpreter does: a message, printed, and status 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(jobs_file: str) -> None:
    # the slow imports, once; the children find them in sys.modules
    import snakemake.cli  # noqa: F401

    import saedynamics.cli  # noqa: F401
    import saedynamics.config  # noqa: F401
    import saedynamics.figures  # noqa: F401
    import saedynamics.tables  # noqa: F401

    with open(jobs_file) as f:
        jobs = json.load(f)
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(job)  # never returns
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        job["rc"] = os.waitstatus_to_exitcode(status)
    with open(jobs_file, "w") as f:
        json.dump(jobs, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
