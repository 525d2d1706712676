"""What the explorer shows of each latent, computed from the eval activations, the SAEs' decoders
and a checkpoint's unembedding. Everything here is arrays in, arrays out; `site.py` reads the
files and writes the pages.

- `encode_eval`: one SAE on the eval tokens, in one pass: each latent's firing density and top
  activations, and every positive code kept sparse, for histograms and the code on any token
  (`Codes`).
- `context_rows`: the tokens around a token, within its document.
- `chains`: a latent of the final SAE followed back through training, one optimal (Hungarian)
  decoder match per pair of consecutive checkpoints (`metrics.consistency.match`, the matching
  of the drift stage).
- `logit_effects`: the tokens a latent's decoder direction promotes and suppresses through the
  unembedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saedynamics.metrics.consistency import match, unit_rows


@dataclass
class Codes:
    """One SAE's codes on the eval tokens: per latent, its firing `density` [F] and its n largest
    codes `top_values` [F, n] (descending) at eval rows `top_rows` (0 and -1 where it fired on
    fewer than n tokens); and every positive code, kept sparse in (row, latent) order: `row`,
    `latent`, `value` (memory: eval tokens x L0 entries)."""

    density: np.ndarray
    top_values: np.ndarray
    top_rows: np.ndarray
    row: np.ndarray
    latent: np.ndarray
    value: np.ndarray

    @property
    def maximum(self) -> np.ndarray:
        """[F] each latent's largest code (0 where it never fires)."""
        return self.top_values[:, 0]

    def histograms(self, bins: int) -> np.ndarray:
        """[F, bins] each latent's positive codes counted in `bins` equal bins over (0, its
        maximum] (a code on a bin's upper edge falls in that bin)."""
        f = len(self.density)
        top = self.maximum[self.latent]
        which = np.clip(np.ceil(self.value / np.where(top > 0, top, 1) * bins), 1, bins) - 1
        flat = self.latent * bins + which.astype(np.int64)
        return np.bincount(flat, minlength=f * bins).reshape(f, bins)

    def at(self, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """The code of latent `latents[...]` on eval row `rows[...]` (arrays of one shape): its
        value where it fires, else 0 (also where the row is -1)."""
        if not len(self.value):
            return np.zeros(rows.shape)
        f = len(self.density)
        keys = self.row * f + self.latent  # ascending: the codes are kept in (row, latent) order
        want = np.where(rows >= 0, rows, 0).astype(np.int64) * f + latents
        i = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        return np.where((rows >= 0) & (keys[i] == want), self.value[i], 0.0)


@torch.no_grad()
def encode_eval(encode: Callable[[Tensor], Tensor], batches: Iterator[Tensor], n: int) -> Codes:
    """`Codes` of `encode` over the eval `batches` (in eval row order), in one pass."""
    values = rows = None
    sparse = []
    offset = 0
    for x in batches:
        codes = encode(x).float()  # [B, F]
        if values is None:
            f = codes.shape[1]
            values = torch.zeros(f, n, device=codes.device)
            rows = torch.full((f, n), -1, dtype=torch.long, device=codes.device)
        batch_values, batch_rows = codes.T.topk(min(n, len(codes)), dim=1)
        fired = batch_values > 0  # a code that is not positive is no activation
        batch_values = torch.where(fired, batch_values, 0)
        batch_rows = torch.where(fired, batch_rows + offset, -1)
        values, pick = torch.cat([values, batch_values], 1).topk(n, dim=1)
        rows = torch.cat([rows, batch_rows], 1).gather(1, pick)
        r, latent = torch.nonzero(codes > 0, as_tuple=True)  # row-major: (row, latent) order
        sparse.append(((r + offset).cpu(), latent.cpu(), codes[r, latent].cpu()))
        offset += len(codes)
    if values is None:
        raise ValueError("no eval batches")
    row, latent, value = (torch.cat(parts).numpy() for parts in zip(*sparse, strict=True))
    return Codes(
        density=np.bincount(latent, minlength=f) / offset,
        top_values=values.cpu().double().numpy(),
        top_rows=rows.cpu().numpy(),
        row=row.astype(np.int64),
        latent=latent.astype(np.int64),
        value=value.astype(np.float64),
    )


def context_rows(doc_id: np.ndarray, pos: np.ndarray, centres: np.ndarray, before: int, after: int):
    """[..., before + 1 + after] the eval rows of the tokens around each row of `centres` (any
    shape; -1 entries stay -1): the same document, positions centre-before .. centre+after, -1
    where the document has no such token. Rows need not be in document order."""
    n_rows = len(doc_id)
    order = np.lexsort((pos, doc_id))  # rows by (document, position)
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = np.arange(n_rows)
    offsets = np.arange(-before, after + 1)
    valid_centre = centres >= 0
    c = np.where(valid_centre, centres, 0)
    at = rank[c][..., None] + offsets  # rank of each context token if the document continues
    inside = (at >= 0) & (at < n_rows)
    rows = order[np.clip(at, 0, n_rows - 1)]
    same = (doc_id[rows] == doc_id[c][..., None]) & (pos[rows] == pos[c][..., None] + offsets)
    return np.where(inside & same & valid_centre[..., None], rows, -1)


def chains(decoders: list[Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Each latent of the last decoder followed back through the earlier ones (ascending order of
    checkpoints, one seed).

    Returns, each [S, F_last]: `latent` (the chained latent at each checkpoint; the last row is
    0..F-1), `cosine_previous` (decoder cosine of the chained latent to its match at the
    previous checkpoint; NaN at the first) and `cosine_final` (to the last decoder's latent).
    The link between consecutive checkpoints is the optimal one-to-one matching by decoder cosine;
    a latent left unmatched (fewer latents earlier) ends its chain there: -1 and NaN before.
    """
    units = [unit_rows(d) for d in decoders]
    s, f = len(units), len(units[-1])
    latent = np.full((s, f), -1, dtype=np.int64)
    cosine_previous = np.full((s, f), np.nan)
    latent[-1] = np.arange(f)
    for i in range(s - 1, 0, -1):
        partner, cosine = match(units[i], units[i - 1])
        here = latent[i]
        ok = here >= 0
        latent[i - 1, ok] = partner[here[ok]]
        cosine_previous[i, ok] = cosine[here[ok]]
    cosine_final = np.full((s, f), np.nan)
    for i in range(s):
        ok = latent[i] >= 0
        cosine_final[i, ok] = np.sum(units[i][latent[i, ok]] * units[-1][ok], axis=1)
    return {"latent": latent, "cosine_previous": cosine_previous, "cosine_final": cosine_final}


def logit_effects(
    directions: Tensor | np.ndarray, unembedding: Tensor, n: int, block: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The tokens each direction [L, d] promotes and suppresses most through `unembedding`
    [vocab, d] (the direct path: logit change = unembedding @ direction).

    Returns (promoted ids, their values, suppressed ids, their values), each [L, n]; promoted in
    descending, suppressed in ascending order of the logit change. Blocks of `block` directions
    keep memory at block x vocab.
    """
    d = torch.as_tensor(np.asarray(directions, dtype=np.float32))
    w = unembedding.float()
    out = [[], [], [], []]
    for part in d.split(block):
        logits = part @ w.T  # [block, vocab]
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        for k, t in enumerate((top.indices, top.values, bottom.indices, bottom.values)):
            out[k].append(t.numpy())
    return tuple(np.concatenate(o) for o in out)
