"""Reconstruction and sparsity of an SAE on held-out activations (spec/measurements.md section 3).

Definitions, with t over all eval tokens and x_bar the mean over the whole eval set:
  FVU   = sum_t |x_t - x_hat_t|^2 / sum_t |x_t - x_bar|^2;  explained_variance = 1 - FVU
          (the global-mean denominator; not SAEBench's `explained_variance`, which has a bug)
  mse   = mean over tokens and dimensions of (x - x_hat)^2  (batch-size independent)
  cossim = mean_t cos(x_t, x_hat_t);  l2_ratio = mean_t |x_hat_t| / |x_t| (1 where |x_t| < 1e-4)
  shrinkage_gamma = sum_t |x_hat_t|^2 / sum_t <x_t, x_hat_t>, the gamma minimising
          sum_t |x_hat_t / gamma - x_t|^2 (Gated SAE paper eq. 10), over the whole set rather than
          averaged per batch, so it does not depend on the batch size; < 1 means shrinkage
  l0 = mean_t #{i: f_i != 0};  l1 = mean_t sum_i |f_i|
  latent density = fraction of tokens on which a latent fires; dead: density 0 over the eval set;
          dense: density > 1% and > 10%
The variance is accumulated with Chan's parallel update, stable where the mean is large.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def batch_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """FVU of one batch (its own mean in the denominator): the training curve's figure."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


@torch.no_grad()
def evaluate(sae, batches: Iterable[Tensor]) -> dict:
    """Metrics of `sae` on raw activation batches [batch, d_in]; see the module docstring."""
    device = next(sae.parameters()).device
    n = 0
    mean = None
    m2 = 0.0  # sum_t |x_t - mean|^2 so far
    sse = cos_sum = ratio_sum = xhat_sq = dot = l0_sum = l1_sum = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    for x in batches:
        x = x.to(device, torch.float32)
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        xd, xh = x.double(), x_hat.double()
        b = len(xd)
        batch_mean = xd.mean(dim=0)
        batch_m2 = (xd - batch_mean).pow(2).sum().item()
        if mean is None:
            mean, m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - mean
            m2 += batch_m2 + delta.pow(2).sum().item() * n * b / (n + b)
            mean = mean + delta * b / (n + b)
        n += b
        sse += (xd - xh).pow(2).sum().item()
        x_norm, xh_norm = xd.norm(dim=1), xh.norm(dim=1)
        cos_sum += ((xd * xh).sum(dim=1) / (x_norm * xh_norm).clamp_min(1e-12)).sum().item()
        ratio_sum += (
            torch.where(x_norm < 1e-4, torch.ones_like(x_norm), xh_norm / x_norm.clamp_min(1e-4))
            .sum()
            .item()
        )
        xhat_sq += xh.pow(2).sum().item()
        dot += (xd * xh).sum().item()
        active = codes != 0
        l0_sum += active.sum().item()
        l1_sum += codes.abs().double().sum().item()
        fired += active.sum(dim=0).double()
    if n == 0:
        raise ValueError("evaluate() got no activations")
    density = (fired / n).cpu()
    fvu = sse / m2
    return {
        "n_tokens": n,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": sse / (n * sae.d_in),
        "sse_per_token": sse / n,
        "cossim": cos_sum / n,
        "l2_ratio": ratio_sum / n,
        "shrinkage_gamma": xhat_sq / dot if dot else float("nan"),
        "l0": l0_sum / n,
        "l1": l1_sum / n,
        "dead_fraction": (density == 0).double().mean().item(),
        "dense_fraction_1pct": (density > 0.01).double().mean().item(),
        "dense_fraction_10pct": (density > 0.1).double().mean().item(),
        "latent_density": density.tolist(),
    }
