"""Seed matching: `match` (sparse, certified exact) against SciPy's dense Hungarian solver.

    python benchmarks/matching.py --sizes 4096 16384 --d 512

Each pair is trained-like: a random dictionary D [F, d] and, as the other seed, D under a random
permutation plus Gaussian noise (noise norm 0.3-1.0 x the row norm, so matched cosines ~0.7-0.96)
with a fraction of rows (default 20%) replaced by fresh random rows that have no partner.
SciPy is timed as the cosine matrix build (float64, what the dense path needs) plus
`linear_sum_assignment(cos, maximize=True)`; ours as one call of `match` (after one warm-up call on
a small pair: thread pools and kernels start once per process). Prints one table.
`--candidate-dtype float32` times the candidate product a CPU without bf16 instructions gets.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs without installing
from saedynamics.metrics import consistency  # noqa: E402
from saedynamics.metrics.consistency import match, unit_rows  # noqa: E402


def trained_like_pair(n: int, d: int, fresh: float, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    noise = rng.uniform(0.3, 1.0, size=(n, 1)) * rng.standard_normal((n, d))
    b = a[rng.permutation(n)] + noise
    n_fresh = int(fresh * n)
    b[rng.choice(n, n_fresh, replace=False)] = rng.standard_normal((n_fresh, d))
    return a.astype(np.float32), b.astype(np.float32)  # decoders are float32


def time_ours(a, b):
    start = time.perf_counter()
    partner, cos = match(a, b)
    return time.perf_counter() - start, partner, float(np.mean(cos))


def time_scipy(a, b):
    start = time.perf_counter()
    cos = unit_rows(a) @ unit_rows(b).T
    built = time.perf_counter()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    solved = time.perf_counter()
    partner = np.empty(len(a), dtype=np.int64)
    partner[rows] = cols
    return built - start, solved - built, partner, float(cos[rows, cols].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--fresh", type=float, default=0.2, help="rows replaced by fresh ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scipy-max", type=int, default=None, help="skip SciPy above this F")
    parser.add_argument(
        "--candidate-dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="the candidate product's dtype (auto: bfloat16 where the CPU has bf16 instructions)",
    )
    args = parser.parse_args()
    if args.candidate_dtype != "auto":  # what a CPU without (or with) bf16 instructions would use
        consistency.candidate_dtype = lambda: getattr(torch, args.candidate_dtype)

    print(
        f"trained-like pairs: d={args.d}, {args.fresh:.0%} fresh rows, seed {args.seed}; "
        f"candidate product in {consistency.candidate_dtype()}, {torch.get_num_threads()} threads"
    )
    header = (
        f"{'F':>6} {'ours s':>8} {'scipy s (cos + solve)':>24} {'speedup':>8} "
        f"{'MCC ours':>10} {'MCC scipy':>10} {'difference':>11} {'same partners':>14}"
    )
    print(header)
    match(*trained_like_pair(1024, args.d, args.fresh, args.seed + 1))  # warm-up
    for n in args.sizes:
        a, b = trained_like_pair(n, args.d, args.fresh, args.seed)
        ours, partner, mcc_ours = time_ours(a, b)
        if args.scipy_max is not None and n > args.scipy_max:
            print(f"{n:>6} {ours:>8.2f} {'skipped':>24} {'':>8} {mcc_ours:>10.6f}")
            continue
        built, solved, dense_partner, mcc_scipy = time_scipy(a, b)
        scipy_s = f"{built + solved:.2f} ({built:.2f} + {solved:.2f})"
        print(
            f"{n:>6} {ours:>8.2f} {scipy_s:>24} {(built + solved) / ours:>7.1f}x "
            f"{mcc_ours:>10.6f} {mcc_scipy:>10.6f} {mcc_ours - mcc_scipy:>11.1e} "
            f"{str(np.array_equal(partner, dense_partner)):>14}"
        )


if __name__ == "__main__":
    main()
