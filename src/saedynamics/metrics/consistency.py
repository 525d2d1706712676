"""Seed consistency: do SAEs trained with different seeds find the same dictionary?

PW-MCC (Song, Muhamed et al. 2025): for two decoders [F, d], unit-normalise the rows, match all F
latents one-to-one so that the summed *signed* cosine is maximal (Hungarian algorithm), and take the
mean matched cosine (dead latents included); PW-MCC is the mean over all seed pairs.

    MCC(D_a, D_b) = max_{pi in Perm(F)} (1/F) sum_i cos(D_a[i], D_b[pi(i)])

Shared fraction (Paulo & Belrose 2025): match encoder rows and decoder rows separately; latent i of
SAE a is shared iff both matchings give it the same partner and both cosines are >= threshold (0.7).

Null baseline: the same statistics for random dictionaries of the same shape (rows i.i.d. Gaussian,
numpy default_rng), which match far above 0 (spec/measurements.md section 1.3). For the shared
fraction the random "SAE" is tied (encoder = decoder^T, as an SAE at init), the conservative choice:
with independent random encoders the chance of agreeing partners would be ~1/F.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
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
    """
    cos = unit_rows(a) @ unit_rows(b).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    partner = np.full(cos.shape[0], -1, dtype=np.int64)
    matched = np.full(cos.shape[0], np.nan)
    partner[rows] = cols
    matched[rows] = cos[rows, cols]
    return partner, matched


def mcc(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Mean matched signed cosine of two dictionaries [F_a, d], [F_b, d] (over min(F_a, F_b) pairs)."""
    return float(np.nanmean(match(a, b)[1]))


def max_cosine(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Mean over rows of a of the best cosine in b, without the one-to-one constraint (upper bound)."""
    return float((unit_rows(a) @ unit_rows(b).T).max(axis=1).mean())


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


def decoder_drift(decoders: dict[int, dict[int, Tensor]], threshold: float = 0.7) -> list[dict]:
    """How the decoders of one (layer, architecture) move across LM checkpoints.

    `decoders[step][seed]` -> [F, d]. For each seed and step: the matched cosine (MCC) of its
    decoder to the same seed's at the next and at the final checkpoint, and the fraction of its
    latents matched there at cosine >= threshold. The SAEs of one seed start from the same init at
    every checkpoint, which alone makes them alike; the same statistic against the *other* seeds
    at the final checkpoint (`mcc_final_other_seeds`) is the control for that.
    """
    steps = sorted(decoders)
    final = steps[-1]
    rows = []
    for i, step in enumerate(steps):
        for seed, dec in sorted(decoders[step].items()):
            to_final = match(dec, decoders[final][seed])[1]
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
            }
            if i + 1 < len(steps):
                to_next = match(dec, decoders[steps[i + 1]][seed])[1]
                row |= {
                    "next_step": steps[i + 1],
                    "mcc_next": float(np.nanmean(to_next)),
                    "stable_next": float(np.nanmean(to_next >= threshold)),
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
