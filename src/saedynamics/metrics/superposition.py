"""Superposition: the effective number of features an SAE uses on a layer
(Bereska et al., "Superposition as Lossy Compression", eqs. 6-8).

    p_i = sum_t |z_{i,t}| / sum_j sum_t |z_{j,t}|     (share of activation mass over ALL tokens)
    F   = exp(H(p)),  H(p) = -sum_i p_i ln p_i,  1 <= F <= d_sae;     psi = F / d_model

The mass is summed over every evaluated token and normalised once (not an entropy per token).
Latents with no mass contribute 0 (the limit of p ln p); the reference code's +1e-10 smoothing
changes F by far less than its sampling error and is not applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def effective_features(codes: Tensor | Iterable[Tensor], d_model: int) -> dict:
    """F, psi = F / d_model, entropy, alive latents, from codes [tokens, d_sae] or batches of them."""
    batches = [codes] if isinstance(codes, Tensor) else codes
    mass, n_tokens = None, 0
    for batch in batches:
        m = batch.abs().double().sum(dim=0)
        mass = m if mass is None else mass + m
        n_tokens += batch.shape[0]
    if mass is None:
        raise ValueError("effective_features() got no codes")
    total = mass.sum()
    if total == 0:
        nan = float("nan")
        return {
            "effective_features": nan,
            "psi": nan,
            "entropy": nan,
            "alive_latents": 0,
            "effective_per_alive": nan,
            "n_tokens": n_tokens,
        }
    p = mass / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    f = math.exp(entropy)
    return {
        "effective_features": f,
        "psi": f / d_model,
        "entropy": entropy,
        "alive_latents": int(p.numel()),
        "effective_per_alive": f / p.numel(),
        "n_tokens": n_tokens,
    }
