"""Reconstruction and sparsity of an SAE on held-out activations (docs/spec/measurements.md section 3).

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

A ratio is reported only where its denominator is clearly positive (`ratio_or_reason`); elsewhere
it is NaN and the row's `<metric>_reason` says why, so that no table holds a number that means
nothing (e.g. CE-loss recovered at LM step 0, where zero-ablation costs nothing to recover).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

# Splicing scores divide by what zero-ablating the layer costs (nats per token). Below this the
# cost is noise: at LM step 0 the zero-ablated model predicts as well as the clean one.
ABLATION_MARGIN_NATS = 0.01


def ratio_or_reason(
    numerator: float, denominator: float, margin: float, why: str
) -> tuple[float, str | None]:
    """(numerator / denominator, None) where denominator > margin, else (NaN, why)."""
    if denominator > margin:
        return numerator / denominator, None
    return float("nan"), why


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
    fvu, fvu_reason = ratio_or_reason(sse, m2, 0.0, "the eval activations have no variance")
    gamma, gamma_reason = ratio_or_reason(
        xhat_sq, dot, 0.0, "the reconstructions are not positively aligned with the inputs"
    )
    return {
        "n_tokens": n,
        "fvu": fvu,
        "fvu_reason": fvu_reason,
        "explained_variance": 1.0 - fvu,
        "mse": sse / (n * sae.d_in),
        "sse_per_token": sse / n,
        "cossim": cos_sum / n,
        "l2_ratio": ratio_sum / n,
        "shrinkage_gamma": gamma,
        "shrinkage_gamma_reason": gamma_reason,
        "l0": l0_sum / n,
        "l1": l1_sum / n,
        "dead_fraction": (density == 0).double().mean().item(),
        "dense_fraction_1pct": (density > 0.01).double().mean().item(),
        "dense_fraction_10pct": (density > 0.1).double().mean().item(),
        "latent_density": density.tolist(),
    }


# ---- spliced into the language model -------------------------------------------------------------


@torch.no_grad()
def spliced_scores(
    model, block, windows: Tensor, saes: dict, first_position: int = 0, batch_sequences: int = 16
) -> dict:
    """CE-loss recovered and KL score of each SAE spliced into `model` at `block`'s output.

    For every window the residual stream after `block` is replaced, at positions >= first_position
    (the positions the SAEs were trained on), by the SAE's reconstruction, or by zeros for the
    ablation baseline; the next-token losses over the whole window are compared:

        ce_loss_score = (L_zero - L_sae) / (L_zero - L_orig)     (1: as the model, 0: as ablation)
        kl_score      = (KL_zero - KL_sae) / KL_zero,  KL_x = mean_t sum_v p_orig log(p_orig / p_x)
        delta_ce      = L_sae - L_orig                           (the JumpReLU/BatchTopK papers)

    Both scores are NaN, with `ce_loss_score_reason` / `kl_score_reason`, where the ablation costs
    at most ABLATION_MARGIN_NATS (L_zero - L_orig or KL_zero): there is nothing to recover.

    `saes`: key -> SAE (encode/decode on raw activations). Returns {"ce_orig", "ce_zero", "kl_zero",
    "n_tokens", "saes": {key: {"ce_sae", "kl_sae", "ce_loss_score", "kl_score", "delta_ce"}}}.
    """
    device = next(model.parameters()).device
    replacement: list = [None]

    def hook(module, args, output):
        if replacement[0] is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        spliced = hidden.clone()
        spliced[:, first_position:] = replacement[0](hidden[:, first_position:])
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    def losses(ids: Tensor, reference_logp: Tensor | None):
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum().item()
        kl = (
            0.0
            if reference_logp is None
            else ((reference_logp.exp() * (reference_logp - logp)).sum(-1).sum().item())
        )
        return logp, ce, kl

    def reconstruct(sae):
        # SAEs see [tokens, d] as in training (per-token k, batch-level thresholds)
        def run(h: Tensor) -> Tensor:
            flat = h.reshape(-1, h.shape[-1]).float()
            return sae.decode(sae.encode(flat)).reshape(h.shape).to(h.dtype)

        return run

    totals = {"orig": 0.0, "zero": 0.0, "kl_zero": 0.0}
    per_sae = {key: {"ce": 0.0, "kl": 0.0} for key in saes}
    n_tokens = 0
    handle = block.register_forward_hook(hook)
    try:
        for start in range(0, len(windows), batch_sequences):
            ids = windows[start : start + batch_sequences].to(device)
            replacement[0] = None
            logp_orig, ce, _ = losses(ids, None)
            totals["orig"] += ce
            replacement[0] = torch.zeros_like
            _, ce, kl = losses(ids, logp_orig)
            totals["zero"] += ce
            totals["kl_zero"] += kl
            for key, sae in saes.items():
                replacement[0] = reconstruct(sae)
                _, ce, kl = losses(ids, logp_orig)
                per_sae[key]["ce"] += ce
                per_sae[key]["kl"] += kl
            n_tokens += ids[:, 1:].numel()
    finally:
        handle.remove()
    ce_orig, ce_zero, kl_zero = (totals[k] / n_tokens for k in ("orig", "zero", "kl_zero"))
    out = {
        "ce_orig": ce_orig,
        "ce_zero": ce_zero,
        "kl_zero": kl_zero,
        "n_tokens": n_tokens,
        "saes": {},
    }
    margin = ABLATION_MARGIN_NATS
    ce_why = (
        f"zero-ablation loss {ce_zero:.4f} is not above the clean loss {ce_orig:.4f}"
        f" by more than {margin} nats: nothing to recover"
    )
    kl_why = f"zero-ablation KL {kl_zero:.4f} is at most {margin} nats: nothing to recover"
    for key, acc in per_sae.items():
        ce_sae, kl_sae = acc["ce"] / n_tokens, acc["kl"] / n_tokens
        ce_score, ce_reason = ratio_or_reason(ce_zero - ce_sae, ce_zero - ce_orig, margin, ce_why)
        kl_score, kl_reason = ratio_or_reason(kl_zero - kl_sae, kl_zero, margin, kl_why)
        out["saes"][key] = {
            "ce_sae": ce_sae,
            "kl_sae": kl_sae,
            "delta_ce": ce_sae - ce_orig,
            "ce_loss_score": ce_score,
            "ce_loss_score_reason": ce_reason,
            "kl_score": kl_score,
            "kl_score_reason": kl_reason,
        }
    return out
