"""Seed consistency: do SAEs trained with different seeds find the same dictionary?

PW-MCC (Song, Muhamed et al. 2025): for two decoders [F, d], unit-normalise the rows, match all F
latents one-to-one so that the summed *signed* cosine is maximal (Hungarian algorithm), and take the
mean matched cosine (dead latents included); PW-MCC is the mean over all seed pairs.

    MCC(D_a, D_b) = max_{pi in Perm(F)} (1/F) sum_i cos(D_a[i], D_b[pi(i)])

Shared fraction (Paulo & Belrose 2025): match encoder rows and decoder rows separately; latent i of
SAE a is shared iff both matchings give it the same partner and both cosines are >= threshold (0.7).

Null baseline: the same statistics for random dictionaries of the same shape (rows i.i.d. Gaussian,
numpy default_rng), which match far above 0 (docs/spec/measurements.md section 1.3). For the shared
fraction the random "SAE" is tied (encoder = decoder^T, as an SAE at init), the conservative choice:
with independent random encoders the chance of agreeing partners would be ~1/F.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching
from torch import Tensor


def unit_rows(m: Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float64; all-zero rows stay zero."""
    m = (
        m.detach().cpu().double().numpy()
        if isinstance(m, Tensor)
        else np.asarray(m, dtype=np.float64)
    )
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms == 0, 1.0, norms)


def match(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of the rows of a to the rows of b by signed cosine.

    Returns (partner, cosine): row i of a is matched to row partner[i] of b with cosine cosine[i].
    With more rows in a than in b, the unmatched rows have partner -1 and cosine NaN.
    Below DENSE_BELOW (1024) rows on either side: SciPy's dense solver (`match_dense`); from there
    the sparse solver with an optimality certificate (`match_sparse`), same optimum, seconds
    instead of minutes at 16384 latents.
    """
    if min(len(a), len(b)) < DENSE_BELOW:
        return match_dense(a, b)
    partner, cosine, _ = match_sparse(a, b)
    return partner, cosine


def match_dense(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`match` by SciPy's dense solver on the full float64 cosine matrix: O(F^3), F^2 memory."""
    cos = unit_rows(a) @ unit_rows(b).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    partner = np.full(cos.shape[0], -1, dtype=np.int64)
    matched = np.full(cos.shape[0], np.nan)
    partner[rows] = cols
    matched[rows] = cos[rows, cols]
    return partner, matched


# ---------------------------------------------------------------------------------------------
# Exact sparse matching for large dictionaries.
#
# At F = 16384 the dense solver needs the 2 GB float64 cosine matrix and minutes, yet a latent's
# partner is almost always among its few most similar latents. So:
# 1. candidates: one pass over blocks of the cosine matrix, in bfloat16 where the CPU multiplies
#    it fast (`candidate_dtype`; the product is most of the time at 16384 latents), keeps each
#    row's best cosines (many for a contested row, one for a clear one) and a bound on all the
#    others, widened by the product's rounding error (`cosine_error`);
# 2. solve the assignment exactly on that sparse graph (LAPJVsp) with integer costs;
# 3. certificate: LP dual potentials of the sparse optimum (shortest paths in the residual graph)
#    give every graph pair a reduced cost >= 0 and the matched pairs 0; every other pair of the
#    FULL matrix is checked (by the bound, else recomputed) and those with a negative reduced cost
#    join the graph, which is solved again, until there are none. Feasible duals with
#    complementary slackness on the matched pairs prove the matching optimal for the full matrix
#    (LP duality): nothing is approximated, the candidates only decide the speed.

DENSE_BELOW = 1024  # fewer rows than this on either side: the dense solver is faster
CANDIDATES = 64  # most cosines kept per row in step 1 ...
NEAR_BEST = 0.2  # ... those within this of the row's best (the certificate makes up for any gap)
FEW = 4  # cosines first found for every row; the rest only where these are all near the best
CHUNK = 64  # columns per chunk in _top_k_chunked
BLOCK_ROWS = 1024  # rows of the cosine matrix held at a time (32 MB at 16384 columns)
COST_SCALE = 2.0**32  # costs are integers round((2 - cos) * 2^32): see _costs
MAX_ROWS = 2**17  # ... whose path sums (< 2^52 up to here) float64 holds exactly


@dataclass
class MatchStats:
    """What `match_sparse` did (the tests check with it that the certificate acts)."""

    candidates: int  # most cosines kept per row
    rounds: int = 0  # sparse solves; 1 = the candidate graph already held the optimum
    added: int = 0  # pairs the certificate added to the graph
    edges: int = 0  # pairs in the final graph
    scanned_rows: int = 0  # rows the certificate recomputed (some of their columns), all rounds
    potential_sweeps: int = 0  # Bellman-Ford sweeps, all rounds


def match_sparse(
    a: Tensor | np.ndarray, b: Tensor | np.ndarray, candidates: int = CANDIDATES
) -> tuple[np.ndarray, np.ndarray, MatchStats]:
    """`match` without the dense matrix, exactly: (partner, cosine, stats). See the notes above.

    The matching is optimal for the integer costs round((2 - cos) * 2^32) of the float64 cosines,
    so its summed cosine is within F * 2^-32 of the dense optimum (mean cosine: 2.3e-10); integers
    make the sparse solver and the shortest paths exact, so no near-tie can make them loop.
    `candidates` changes the speed, never the result. Matched cosines are recomputed in float64.
    Any F up to MAX_ROWS, rectangular too; all-zero rows are fine (cosine 0 with everything).
    """
    threads = torch.get_num_threads()  # for the one large product; the rest runs on one thread:
    with _torch_threads(1):  # OpenMP threads of small ops wait on each other when cores are busy
        return _match_sparse(unit_rows(a), unit_rows(b), candidates, threads)


def _match_sparse(ua: np.ndarray, ub: np.ndarray, candidates: int, threads: int):
    """match_sparse of unit rows. The rows solved for: the side with fewer (or fewer zero) rows."""
    zero_a, zero_b = ~ua.any(axis=1), ~ub.any(axis=1)
    if len(ua) > len(ub) or (len(ua) == len(ub) and zero_b.sum() > zero_a.sum()):
        partner_b, _, stats = _match_sparse(ub, ua, candidates, threads)  # rows: the smaller side
        partner = np.full(len(ua), -1, dtype=np.int64)
        partner[partner_b[partner_b >= 0]] = np.flatnonzero(partner_b >= 0)
    else:
        # all-zero rows have cosine 0 with every row, like the dummy rows that pad the problem
        # square: match the others, then give them columns left over (ties would slow the solver)
        live = np.flatnonzero(~zero_a)
        partner = np.full(len(ua), -1, dtype=np.int64)
        partner[live], stats = _solve_certified(
            ua[live] if zero_a.any() else ua, ub, candidates, threads
        )
        free = np.setdiff1d(np.arange(len(ub)), partner[live])
        partner[zero_a] = free[: zero_a.sum()]
    cosine = np.full(len(ua), np.nan)
    rows = np.flatnonzero(partner >= 0)
    cosine[rows] = _cosines(ua, ub, rows, partner[rows])
    return partner, cosine, stats


def _solve_certified(ua: np.ndarray, ub: np.ndarray, candidates: int, threads: int):
    """Optimal partner of every row of ua (len(ua) <= len(ub)) and the stats."""
    m, n = len(ua), len(ub)
    ua32, ub32 = ua.astype(np.float32), ub.astype(np.float32)
    stats = MatchStats(candidates=min(candidates, n))
    if n > MAX_ROWS:
        raise ValueError(f"match_sparse takes at most {MAX_ROWS} rows a side, not {n}")
    if m == 0:
        return np.empty(0, dtype=np.int64), stats
    rows, cols, bound = _top_candidates(ua32, ub32, stats.candidates, threads)
    rows, cols = _make_feasible(ua32, ub32, rows, cols, stats.candidates)
    graph = _Graph(m, n)
    graph.add(rows, cols, _costs(ua, ub, rows, cols))
    potentials = np.zeros(m), np.zeros(n), 0.0
    while True:
        stats.rounds += 1
        partner = _solve_sparse(graph)
        potentials, sweeps = _potentials(graph, partner, potentials)
        row_pot, col_pot, _ = potentials
        stats.potential_sweeps += sweeps
        rows, cols, cost, scanned = _violations(
            ua, ub, ua32, ub32, bound, row_pot, col_pot, graph, stats.candidates
        )
        stats.scanned_rows += scanned
        if len(rows) == 0:
            stats.edges = len(graph.keys)
            return partner, stats
        graph.add(rows, cols, cost)
        stats.added += len(rows)


def _make_feasible(ua32, ub32, rows, cols, c: int):
    """Candidate pairs plus enough pairs that a full matching exists (LAPJVsp raises otherwise).

    Columns in no row's candidates (e.g. latents of b whose partner in a is gone) get their c best
    rows. Rows then left out of a maximum matching of the graph get their c best columns among the
    columns left out, and the k-th of them is paired with the k-th such column: that completes the
    matching (an arbitrary pair the solver avoids if it can; the certificate repairs the rest).
    """
    m, n = len(ua32), len(ub32)
    lonely = np.setdiff1d(np.arange(n), cols)
    lonely_cols, lonely_rows, _ = _top_candidates(ub32[lonely], ua32, c)
    rows, cols = np.r_[rows, lonely_rows], np.r_[cols, lonely[lonely_cols]]
    pattern = csr_array((np.ones(len(rows)), (rows, cols)), shape=(m, n))
    col_of_row = maximum_bipartite_matching(pattern, perm_type="column")
    free_rows = np.flatnonzero(col_of_row < 0)
    free_cols = np.setdiff1d(np.arange(n), col_of_row)
    if len(free_rows) == 0:
        return rows, cols
    extra_rows, extra_cols, _ = _top_candidates(ua32[free_rows], ub32[free_cols], c)
    rows = np.concatenate([rows, free_rows[extra_rows], free_rows])
    cols = np.concatenate([cols, free_cols[extra_cols], free_cols[: len(free_rows)]])
    return rows, cols


class _Graph:
    """Candidate pairs (i, j) with integer costs, unique and sorted by (row, column)."""

    def __init__(self, m: int, n: int):
        self.m, self.n = m, n
        self.keys = np.empty(0, dtype=np.int64)  # key = i * n + j
        self.cost = np.empty(0)

    def add(self, rows: np.ndarray, cols: np.ndarray, cost: np.ndarray) -> None:
        keys, first = np.unique(rows.astype(np.int64) * self.n + cols, return_index=True)
        new = ~self.contains(keys)
        keys = np.concatenate([self.keys, keys[new]])
        order = np.argsort(keys, kind="stable")
        self.keys, self.cost = keys[order], np.concatenate([self.cost, cost[first][new]])[order]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        return (self.keys[at] == keys) if len(self.keys) else np.zeros(len(keys), dtype=bool)

    @property
    def rows(self) -> np.ndarray:
        return self.keys // self.n

    @property
    def cols(self) -> np.ndarray:
        return self.keys % self.n


def _cosines(ua: np.ndarray, ub: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 cosines of the pairs (rows[k], cols[k]), as a sampled matrix product (SDDMM): each
    row is read once, not copied once per pair."""
    n = len(ub)
    keys, pair = np.unique(rows.astype(np.int64) * n + cols, return_inverse=True)
    row_starts = np.searchsorted(keys // n, np.arange(len(ua) + 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            torch.from_numpy(row_starts),
            torch.from_numpy(keys % n),
            torch.zeros(len(keys), dtype=torch.float64),
            size=(len(ua), n),
            check_invariants=False,
        )
        product = torch.sparse.sampled_addmm(
            pattern, torch.from_numpy(ua), torch.from_numpy(ub).T, beta=0.0
        )
    return product.values().numpy()[pair]


def _costs(ua: np.ndarray, ub: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Integer costs round((2 - cos) * 2^32) in [2^32, 3 * 2^32] (float64, exact).

    Strictly positive, so no edge is an explicit zero that sparse formats drop; integers, so every
    sum the solver and Bellman-Ford form is exact (below 2^53 up to MAX_ROWS rows).
    """
    return np.rint((2.0 - _cosines(ua, ub, rows, cols)) * COST_SCALE)


def _top_candidates(ua32: np.ndarray, ub32: np.ndarray, c: int, threads: int = 1):
    """Candidate pairs from blocks of rows of the cosine matrix, in `candidate_dtype()`.

    Row i keeps those of its c largest cosines within NEAR_BEST of its largest: a latent with a
    clear partner needs one candidate, a contested one many. Returns (rows, cols, bound): every
    pair left out has a cosine <= bound[i] (the certificate's row bound; the product's rounding
    error, `cosine_error`, is included, so it bounds the exact cosine). The product and its
    first scan run on `threads` threads.
    """
    m, n = len(ua32), len(ub32)
    c = min(c, n)
    few = min(FEW, c)
    top_val = np.full((m, c), -np.inf, dtype=np.float32)
    top_col = np.zeros((m, c), dtype=np.int64)
    # one block of rows at a time, its width padded with -inf to whole chunks (see _top_k_chunked)
    dtype = candidate_dtype()
    block = torch.empty((min(BLOCK_ROWS, m), -(-n // CHUNK) * CHUNK), dtype=dtype)
    block[:, n:] = -torch.inf
    ua_low, ub_low = torch.from_numpy(ua32).to(dtype), torch.from_numpy(ub32).to(dtype)
    for s in range(0, m, BLOCK_ROWS):
        size = min(BLOCK_ROWS, m - s)
        cos = block[:size]
        with _torch_threads(threads):  # the product and its first scan: most of the time
            torch.mm(ua_low[s : s + size], ub_low.T, out=cos[:, :n])
            val, col = _top_k_chunked(cos, few)
        top_val[s : s + size, :few], top_col[s : s + size, :few] = val.float(), col
        # rows whose `few` best are all near their best are contested: take their c best
        contested = torch.nonzero(val[:, -1] >= val[:, 0] - NEAR_BEST)[:, 0]
        val, col = torch.topk(cos[contested], c, dim=1)
        top_val[s + contested.numpy()], top_col[s + contested.numpy()] = val.float(), col
    keep = top_val >= top_val[:, :1] - NEAR_BEST  # a prefix of each row: the values are sorted
    n_kept = keep.sum(axis=1)
    bound = np.where(n_kept < c, top_val[np.arange(m), np.minimum(n_kept, c - 1)], top_val[:, -1])
    bound = bound.astype(np.float64) + cosine_error(ua32.shape[1], dtype)
    return np.nonzero(keep)[0], top_col[keep], bound


def cosine_error(d: int, dtype: torch.dtype) -> float:
    """A bound on |product in `dtype` - exact cosine| for rows of unit norm (float32), d dims.

    Rounding both rows to `dtype` (unit roundoff u: 2^-8 for bfloat16, 2^-24 for float32) moves
    each product a_k b_k by at most (2u + u^2)|a_k b_k|, and sum_k |a_k b_k| <= |a| |b| = 1; the
    float32 accumulation adds at most d * 2^-24 of that sum; rounding the result to `dtype` at most
    u |result| <= u (1 + 3u). Hence 3u(1 + 2u) + d * 2^-23 (float32 row norms' error included).
    """
    u = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    return 3 * u * (1 + 2 * u) + _float32_dot_error(d)


def _float32_dot_error(d: int) -> float:
    """A bound on |float32 dot product - exact| for float32 rows of unit norm, d dims:
    2 (d + 2) float32 unit roundoffs (the accumulation, and the rows' norms' error)."""
    return (d + 4) * 2.0**-23


@functools.cache
def candidate_dtype() -> torch.dtype:
    """The dtype of the candidate product: bfloat16 where the CPU has bf16 dot-product
    instructions (AVX512-BF16, AMX, Arm BF16; ~3.5x float32's speed at 16384 latents on the build
    machine), float32 elsewhere (without them bf16 is emulated, slower). Either gives the same
    optimum: only the error bound, and so the certificate's work, differs."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read
        return torch.float32
    fast = re.search(r"^(flags|Features)\s*:.*\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo, re.M)
    return torch.bfloat16 if fast else torch.float32


def _top_k_chunked(cos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(cos, k, dim=1) for small k, ~4x faster: the k largest of a row lie in the k chunks
    (of CHUNK columns) with the largest maxima, and a chunk's maximum is cheap."""
    rows, width = cos.shape
    chunks = cos.view(rows, width // CHUNK, CHUNK)
    best = torch.topk(chunks.amax(dim=2), min(k, width // CHUNK), dim=1).indices
    values = chunks.gather(1, best[:, :, None].expand(-1, -1, CHUNK)).reshape(rows, -1)
    val, at = torch.topk(values, k, dim=1)
    return val, best.gather(1, at // CHUNK) * CHUNK + at % CHUNK


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve_sparse(graph: _Graph) -> np.ndarray:
    """Column of every row in the min-cost full matching of the graph (LAPJVsp, exact)."""
    biadjacency = csr_array((graph.cost, (graph.rows, graph.cols)), shape=(graph.m, graph.n))
    rows, cols = min_weight_full_bipartite_matching(biadjacency)
    partner = np.empty(graph.m, dtype=np.int64)
    partner[rows] = cols
    return partner


def _potentials(graph: _Graph, partner: np.ndarray, start: tuple):
    """LP duals of the sparse optimum: shortest-path distances in the residual graph.

    Residual graph: row i -> column j with cost c_ij (every graph pair), column partner[i] -> row i
    with cost -c_i,partner[i]. With more columns than rows, one node D stands for the dummy rows
    that pad the problem square at cost 0: D -> every column, unmatched column -> D, at cost 0.
    Distances start at `start` (a virtual source with edges of those lengths: zeros, or the last
    round's potentials, most of which still hold); Bellman-Ford sweeps relax the edges out of the
    rows whose distance dropped. The matching is optimal on the graph: no negative cycle, so the
    sweeps stop. Returns ((row_pot, col_pot, dummy), sweeps): the reduced cost
    c_ij + row_pot[i] - col_pot[j] is >= 0 on every graph pair and 0 on the matched ones, and
    col_pot <= dummy with equality on unmatched columns (the padded duals are feasible too).
    """
    m, n = graph.m, graph.n
    rows, cols, cost = graph.rows, graph.cols, graph.cost
    row_starts = np.searchsorted(rows, np.arange(m + 1))  # the pairs are sorted by row
    matched_cost = cost[np.searchsorted(graph.keys, np.arange(m) * n + partner)]
    row_of_col = np.full(n, -1)
    row_of_col[partner] = np.arange(m)
    unmatched = row_of_col < 0
    row_pot, col_pot, dummy = start[0].copy(), start[1].copy(), start[2]
    col_pot = np.minimum(col_pot, dummy)
    row_pot = np.minimum(row_pot, col_pot[partner] - matched_cost)
    active = np.arange(m)  # rows whose distance dropped
    for sweep in range(1, m + n + 3):
        if len(active) == 0:
            return (row_pot, col_pot, dummy), sweep
        before = col_pot.copy()
        edges = _ranges(row_starts[active], row_starts[active + 1])
        np.minimum.at(col_pot, cols[edges], row_pot[rows[edges]] + cost[edges])
        if unmatched.any():
            dummy = min(dummy, col_pot[unmatched].min())
            np.minimum(col_pot, dummy, out=col_pot)
        dropped = row_of_col[col_pot < before]
        dropped = dropped[dropped >= 0]
        via_match = col_pot[partner[dropped]] - matched_cost[dropped]
        active = dropped[via_match < row_pot[dropped]]
        row_pot[active] = col_pot[partner[active]] - matched_cost[active]
    raise RuntimeError("negative cycle in the residual graph: the sparse matching is not optimal")


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated aranges starts[k]:ends[k]."""
    lengths = ends - starts
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(lengths.sum())


def _violations(ua, ub, ua32, ub32, bound, row_pot, col_pot, graph: _Graph, per_row: int):
    """Pairs of the full matrix outside the graph with a negative reduced cost, and their costs.

    A pair outside the graph has cos <= bound[i], so its reduced cost is >= 0 unless
    col_pot[j] > h[i]: only those columns of a row are recomputed, in float32, and pairs within the
    float32 error `err` of a violation are checked exactly. Returns the
    violations (at most per_row a row, the worst) as (rows, cols, costs), and the rows scanned.
    """
    d = ua.shape[1]
    err = _float32_dot_error(d)  # >= |float32 cos - float64 cos|
    h = (2.0 - bound) * COST_SCALE - 0.5 + row_pot
    by_pot = np.argsort(-col_pot, kind="stable")
    n_cols = np.searchsorted(-col_pot[by_pot], -h, side="left")  # columns with col_pot > h[i]
    scan = np.flatnonzero(n_cols > 0)
    scan = scan[np.argsort(-n_cols[scan], kind="stable")]
    # screen in float32: cos + g[j] > t[i] - slack  <=>  reduced cost may be < 0
    g = col_pot / COST_SCALE
    t = 2.0 - err + (row_pot - 0.5) / COST_SCALE
    slack = (4.0 + np.abs(g).max() + np.abs(t).max()) * 2.0**-22
    found_rows, found_cols = [], []
    if len(scan):
        by_pot = by_pot[: n_cols[scan[0]]]  # the longest prefix any row needs
        prefix = torch.from_numpy(ub32[by_pot])
        g32 = torch.from_numpy(g[by_pot].astype(np.float32))
    for s in range(0, len(scan), BLOCK_ROWS // 4):
        rows = scan[s : s + BLOCK_ROWS // 4]
        length = n_cols[rows[0]]  # rows are sorted by prefix length, longest first
        screen = torch.from_numpy(ua32[rows]) @ prefix[:length].T
        screen += g32[:length]
        threshold = torch.from_numpy((t[rows] - slack).astype(np.float32))
        hit_r, hit_c = torch.nonzero(screen > threshold[:, None]).T.numpy()
        found_rows.append(rows[hit_r])
        found_cols.append(by_pot[hit_c])
    rows = np.concatenate(found_rows) if found_rows else np.empty(0, dtype=np.int64)
    cols = np.concatenate(found_cols) if found_cols else np.empty(0, dtype=np.int64)
    outside = ~graph.contains(rows * graph.n + cols)
    rows, cols = rows[outside], cols[outside]
    cost = _costs(ua, ub, rows, cols)
    worst = _most_negative(rows, cost + row_pot[rows] - col_pot[cols], per_row)
    return rows[worst], cols[worst], cost[worst], len(scan)


def _most_negative(rows: np.ndarray, reduced: np.ndarray, per_row: int) -> np.ndarray:
    """Indices of the negative reduced costs, the most negative per_row of each row: potentials
    distorted by a poor first graph can make most of a row negative, and adding it all would
    densify the graph."""
    negative = np.flatnonzero(reduced < 0)
    # by row, most negative first
    negative = negative[np.lexsort((reduced[negative], rows[negative]))]
    rank = np.arange(len(negative)) - np.searchsorted(rows[negative], rows[negative])
    return negative[rank < per_row]


def mcc(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Mean matched signed cosine of two dictionaries [F_a, d], [F_b, d] (over min(F_a, F_b) pairs)."""
    return float(np.nanmean(match(a, b)[1]))


def max_cosine(a: Tensor | np.ndarray, b: Tensor | np.ndarray, block_rows: int = 1024) -> float:
    """Mean over rows of a of the best cosine in b, without the one-to-one constraint (upper bound).
    In blocks of rows: the full matrix at 16384 latents would be 2 GB."""
    ua, ub = unit_rows(a), unit_rows(b)
    best = [(ua[s : s + block_rows] @ ub.T).max(axis=1) for s in range(0, len(ua), block_rows)]
    return float(np.concatenate(best).mean())


def summarise(values) -> dict:
    """Mean and std (ddof 0) over seed pairs."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}


def pw_mcc(decoders: list[Tensor]) -> dict:
    """PW-MCC of decoders [F, d] (one per seed): mean, std (over pairs, ddof 0) and per pair."""
    if len(decoders) < 2:
        raise ValueError("pw_mcc needs at least two decoders")
    pairs = [
        {"a": i, "b": j, "mcc": mcc(decoders[i], decoders[j])}
        for i, j in itertools.combinations(range(len(decoders)), 2)
    ]
    return {**summarise([p["mcc"] for p in pairs]), "pairs": pairs}


def shared_latents(sae_a, sae_b, threshold: float = 0.7, matchings=None) -> np.ndarray:
    """Boolean per latent of sae_a: shared with sae_b (same enc and dec partner, both cos >= threshold).

    `matchings`: the (encoder, decoder) results of `match`, when already computed.
    """
    enc, dec = matchings or (match(sae_a.W_enc.T, sae_b.W_enc.T), match(sae_a.W_dec, sae_b.W_dec))
    (enc_partner, enc_cos), (dec_partner, dec_cos) = enc, dec
    agree = (enc_partner == dec_partner) & (enc_partner >= 0)
    with np.errstate(invalid="ignore"):  # NaN cosines (unmatched rows) are not shared
        return agree & (enc_cos >= threshold) & (dec_cos >= threshold)


def shared_fraction(sae_a, sae_b, threshold: float = 0.7) -> float:
    """Fraction of sae_a's latents shared with sae_b (Paulo & Belrose 2025)."""
    return float(shared_latents(sae_a, sae_b, threshold).mean())


def compare(sae_a, sae_b, threshold: float = 0.7, latents: bool = False) -> dict:
    """Every pairwise statistic of two SAEs from one encoder and one decoder matching.

    With `latents`, also the per-latent shared masks of both SAEs ("shared_a", "shared_b": a
    shared latent of a and its partner in b are both shared).
    """
    enc = match(sae_a.W_enc.T, sae_b.W_enc.T)
    dec = match(sae_a.W_dec, sae_b.W_dec)
    shared = shared_latents(sae_a, sae_b, threshold, (enc, dec))
    out = {
        "mcc": float(np.nanmean(dec[1])),
        "encoder_mcc": float(np.nanmean(enc[1])),
        "max_cosine": max_cosine(sae_a.W_dec, sae_b.W_dec),
        "shared_fraction": float(shared.mean()),
    }
    if latents:
        shared_b = np.zeros(sae_b.W_dec.shape[0], dtype=bool)
        shared_b[dec[0][shared]] = True
        out |= {"shared_a": shared, "shared_b": shared_b}
    return out


def decoder_drift(
    decoders: dict[int, dict[int, Tensor]],
    threshold: float = 0.7,
    alive: dict[int, dict[int, np.ndarray]] | None = None,
) -> list[dict]:
    """How the decoders of one (layer, architecture) move across LM checkpoints.

    `decoders[step][seed]` -> [F, d]. For each seed and step: the matched cosine (MCC) of its
    decoder to the same seed's at the next and at the final checkpoint, and the fraction of its
    latents matched there at cosine >= threshold. The SAEs of one seed start from the same init at
    every checkpoint, which alone makes them alike; the same statistic against the *other* seeds
    at the final checkpoint (`mcc_final_other_seeds`) is the control for that.

    Latent persistence between consecutive checkpoints, from the same matching to the next step:
    `alive[step][seed]` -> bool [F] (fired on the eval tokens; every latent when `alive` is None).
    `n_alive` latents are alive at the step, `n_alive_next` at the next one; `kept_next` of them
    are matched at cosine >= threshold to a latent alive at the next step, `lost_next` = n_alive -
    kept_next are not, and `born_next` = n_alive_next - kept_next alive latents of the next step
    have no such partner (the matching is one-to-one, so n_alive - lost + born = n_alive_next).
    NaN at the final step, which has no next one.
    """
    steps = sorted(decoders)
    final = steps[-1]

    def alive_of(step: int, seed: int) -> np.ndarray:
        if alive is None:
            return np.ones(len(decoders[step][seed]), dtype=bool)
        return np.asarray(alive[step][seed], dtype=bool)

    rows = []
    for i, step in enumerate(steps):
        for seed, dec in sorted(decoders[step].items()):
            to_final = match(dec, decoders[final][seed])[1]
            here = alive_of(step, seed)
            others = [mcc(dec, d) for s, d in decoders[final].items() if s != seed]
            row = {
                "step": step,
                "seed": seed,
                "final_step": final,
                "mcc_final": float(np.nanmean(to_final)),
                "stable_final": float(np.nanmean(to_final >= threshold)),
                "mcc_final_other_seeds": float(np.mean(others)) if others else float("nan"),
                "next_step": None,
                "mcc_next": float("nan"),
                "stable_next": float("nan"),
                "n_latents": int(len(dec)),
                "n_alive": int(here.sum()),
                "n_alive_next": float("nan"),
                "kept_next": float("nan"),
                "lost_next": float("nan"),
                "born_next": float("nan"),
            }
            if i + 1 < len(steps):
                partner, to_next = match(dec, decoders[steps[i + 1]][seed])
                there = alive_of(steps[i + 1], seed)
                paired = partner >= 0
                kept = np.zeros(len(partner), dtype=bool)
                kept[paired] = (
                    here[paired] & there[partner[paired]] & (to_next[paired] >= threshold)
                )
                row |= {
                    "next_step": steps[i + 1],
                    "mcc_next": float(np.nanmean(to_next)),
                    "stable_next": float(np.nanmean(to_next >= threshold)),
                    "n_alive_next": int(there.sum()),
                    "kept_next": int(kept.sum()),
                    "lost_next": int(here.sum() - kept.sum()),
                    "born_next": int(there.sum() - kept.sum()),
                }
            rows.append(row)
    return rows


class _Dictionary:
    """A stand-in SAE with given encoder/decoder rows, for the null baseline."""

    def __init__(self, decoder: np.ndarray, encoder_rows: np.ndarray):
        self.W_dec = torch.from_numpy(decoder)
        self.W_enc = torch.from_numpy(encoder_rows.T)


def null_baseline(
    n_latents: int, d_model: int, threshold: float = 0.7, draws: int = 2, seed: int = 0
) -> dict:
    """PW-MCC, max-cos and shared fraction of pairs of random dictionaries [n_latents, d_model]."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(draws):
        a = rng.standard_normal((n_latents, d_model))
        b = rng.standard_normal((n_latents, d_model))
        results.append(compare(_Dictionary(a, a), _Dictionary(b, b), threshold))
    return {
        "pw_mcc": float(np.mean([r["mcc"] for r in results])),
        "max_cosine": float(np.mean([r["max_cosine"] for r in results])),
        "shared_fraction": float(np.mean([r["shared_fraction"] for r in results])),
        "draws": draws,
        "seed": seed,
    }
