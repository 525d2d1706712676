"""The feature explorer's share of the demo: run the whole demo from nothing in a temporary copy of
the checkout (`snakemake --cores all`, as the README's quick start), then print its wall time, the
explorer job's (from its Snakemake benchmark file) and the ratio, with the site's size.

    python benchmarks/explorer.py [--cores N] [--keep]

Target (issue 20): the explorer takes <= 10% of the demo's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", default="all")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="saedynamics-explorer-bench-"))
    for name in ("Snakefile", "workflow", "src"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", args.cores, "--quiet"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"the demo failed:\n{out.stderr[-4000:]}")
    root = work / "results/demo"
    jobs = {
        str(p.relative_to(root / "benchmarks").with_suffix("")): pd.read_csv(p, sep="\t")["s"][0]
        for p in (root / "benchmarks").rglob("*.tsv")
    }
    manifest = json.loads((root / "explorer/manifest.json").read_text())
    explorer = jobs["explorer"]
    print(f"demo from nothing, --cores {args.cores}: {wall:.0f} s wall, {len(jobs)} jobs")
    print(
        f"  explorer job        {explorer:6.1f} s   {100 * explorer / wall:5.1f}% of the wall time"
    )
    print(f"  figures job         {jobs['figures']:6.1f} s   {100 * jobs['figures'] / wall:5.1f}%")
    print(
        f"  site: {manifest['latent_pages']} latent pages, {len(manifest['files'])} files, "
        f"{manifest['bytes'] / 1e6:.1f} MB (build {manifest['build_seconds']} s inside the job)"
    )
    print(f"  target <= 10%: {'met' if explorer <= 0.1 * wall else 'NOT met'}")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
