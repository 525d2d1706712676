"""Gradient SAE, g-SAE (Olmo et al. 2025, "Features that Make a Difference: Leveraging Gradients
for Improved Dictionary Learning", NAACL Findings, arXiv 2411.10397).

Method. A TopK SAE (`topk`, spec section 2) whose choice of the k active latents also weighs how
much each latent would change the LM's loss. With g = dL/dx the gradient of the LM next-token loss
with respect to the hooked activation (the `lm_grad` column, one vector per token), latent i's
first-order effect on the loss per unit of activation is d_i . g, since x_hat = sum_i f_i d_i + b_dec.
Per token:

    pre = (x - b_dec) W_enc + b_enc,   z = ReLU(pre)
    s_i = |d_i . g| / mean_j |d_j . g|                    (per-token normalisation, see below)
    score_i = z_i + beta * z_i * s_i = z_i (1 + beta s_i)
    S = top-k indices of score;   f_i = z_i for i in S, 0 otherwise;   x_hat = f W_dec + b_dec

The selection S is non-differentiable (computed without gradient); the gradient flows through the
kept values z_i as in TopK, so g only decides *which* latents train on a token. Loss: the
reconstruction error mean_b |x - x_hat|^2 plus aux_alpha * AuxK (spec 0.3) over the dead latents,
kept as in TopK (assumed: the paper reports fewer dead latents than TopK, not how it trains them).
Init and constraint as TopK (spec 13 *(proposed)*): unit-norm decoder rows with the gradient
projected onto the sphere, W_enc = W_dec^T, b_enc = 0, b_dec = geometric median of the first batch;
lr 2e-4 / sqrt(d_sae / 2^14) (dictionary_learning's TopK rule); k_aux = d_in / 2, alpha = 1/32.

Inference. The gradient needs the next token (a label), which an SAE applied to activations alone
does not have, so `encode` is plain top-k on z (spec 13 *(proposed; paper choice unverified)*).
Top-k of z then ReLU equals top-k of pre then ReLU, so at inference a g-SAE *is* a SAELens `topk`
SAE with the same k and is saved as one. With beta = 0 training is exactly TopK.

Choices where the paper (abstract only here) and the spec leave the detail open:
- Normalisation of |d_i . g| (`grad_normalisation`): "mean" (default) divides by its mean over the
  token's latents, so s is dimensionless with mean 1 on every token. The raw |d_i . g| scales with
  |g|, which varies by orders of magnitude between tokens, and between the LM checkpoints and layers
  this study compares; unnormalised, one beta would mean "gradient ignored" on some and "gradient
  decides alone" on others. A per-token rescaling does not change which latents a token prefers by
  gradient, only how much that preference weighs against z. "none" uses |d_i . g| as is (the
  formula as the spec writes it), for porting a beta from the paper once its method text is read.
  A token with g = 0 (no loss there) falls back to plain top-k. Both forms are invariant to the
  trainer's input scale: g is stored as dL/dx and scaled by 1/s with x scaled by s.
- beta = 1.0 (default; the paper's value is unknown, sweep it): with mean normalisation the gradient
  term then carries the same average weight as the activation term (score = z (1 + s), E s = 1),
  the midpoint between activation-only selection (beta = 0) and gradient-dominated selection.
- The value kept is z = ReLU(pre), not the score: the score only ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from saedynamics.saes.base import LossOutput, TrainStep, auxk_loss, mean_squared_error, register
from saedynamics.saes.topk import TopKSAE

GRADIENT = "lm_grad"


@register("gsae")
class GradientSAE(TopKSAE):
    class Config(TopKSAE.Config):
        beta: float = Field(
            default=1.0, ge=0, description="weight of the gradient term in the top-k selection"
        )
        grad_normalisation: Literal["mean", "none"] = Field(
            default="mean",
            description="per-token scaling of |d_i . g|: 'mean' divides by its mean over latents "
            "(beta dimensionless); 'none' uses it as is",
        )

    title = "g-SAE"
    saelens_architecture = "topk"
    requires = (GRADIENT,)

    @torch.no_grad()
    def selection_scores(self, z: Tensor, grad: Tensor) -> Tensor:
        """score_i = z_i (1 + beta * s_i), s_i = |d_i . g| normalised per token."""
        s = (grad @ self.W_dec.T).abs()
        if self.cfg.grad_normalisation == "mean":
            s = s / s.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return z * (1 + self.cfg.beta * s)

    def train_codes(self, pre: Tensor, grad: Tensor) -> Tensor:
        """The training codes: z = ReLU(pre) at the top-k indices of the gradient-aware score."""
        z = pre.relu()
        indices = self.selection_scores(z, grad).topk(self.cfg.k, dim=-1).indices
        return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        if not extras or GRADIENT not in extras:
            raise ValueError(
                f"gsae trains on the LM-loss gradient: extras[{GRADIENT!r}] is missing "
                f"(the activation file needs the {GRADIENT!r} column)"
            )
        pre = self.pre_acts(x)
        codes = self.train_codes(pre, extras[GRADIENT])
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        aux = auxk_loss(
            x, x_hat, pre, self.W_dec, self.dead_mask(), self.cfg.aux_k or self.d_in // 2
        )
        total = mse + self.cfg.aux_alpha * aux
        return LossOutput(total, {"mse": mse, "auxk": aux}, codes, x_hat)

    def saelens_config(self) -> dict:
        # the exported decoder rows have norm 1 / input_scale: SAELens must not rescale by them
        return {**super().saelens_config(), "rescale_acts_by_decoder_norm": False}
