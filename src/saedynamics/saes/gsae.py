"""Gradient SAE, g-SAE (Olmo et al. 2025, "Features that Make a Difference: Leveraging Gradients
for Improved Dictionary Learning", Findings of NAACL 2025, pp. 7609-7619; arXiv 2411.10397).

Source of the equations. The paper's method section could not be read here in full (no copy of its
body was reachable; see docs/architectures.md): the selection rule below is the paper's equation as a
rendering of the paper quotes it, TopK(z + beta z (.) |W_dec^T . grad_x L(x)|), with W_dec in the
paper's [d_in, d_sae] layout; the rest is the abstract ("augmenting the TopK activation function to
rely on the gradients of the input activation when selecting the k elements"), the paper's TopK
base (Gao et al. 2024) and the choices documented as such.

Method. A TopK SAE whose choice of the k active latents also weighs how much each latent would
change the LM's loss. With g = dL/dx the gradient of the LM next-token loss with respect to the
hooked activation (the `lm_grad` column, one vector per token), latent i's first-order effect on the
loss per unit of activation is d_i . g (x_hat = sum_i f_i d_i + b_dec; d_i is row i of our W_dec).
Per token:

    pre = (x - b_dec) W_enc + b_enc,   z = ReLU(pre)
    s_i = |d_i . g|                                       (the paper's |W_dec^T grad_x L|)
    score_i = z_i + beta * z_i * s_i
    S = top-k indices of score;   f_i = z_i for i in S, 0 otherwise;   x_hat = f W_dec + b_dec

The selection S is non-differentiable (computed without gradient); the gradient flows through the
kept values z_i as in TopK, so g only decides *which* latents train on a token, and the value kept
is z, not the score (the score only ranks). Loss: the reconstruction error mean_b |x - x_hat|^2
plus aux_alpha * AuxK over the dead latents, kept from the TopK base. Init and constraint as TopK:
unit-norm decoder rows with the gradient projected onto the sphere, W_enc = W_dec^T, b_enc = 0,
b_dec = geometric median of the first batch; lr 2e-4 / sqrt(d_sae / 2^14); k_aux = d_in / 2,
alpha = 1/32. With beta = 0 training is exactly TopK.

Units of beta. s_i is measured in the trainer's scaled space (x scaled by the input scale c, g
stored as dL/dx and so scaled by 1/c, decoder rows of unit norm there): s_i = |d_i . g| / c for a
unit row d_i of raw space, so beta means "per unit of the scaled input". The exported SAE (rows of
norm 1 / c on raw activations) makes the same selection from raw x and g. `grad_normalisation =
"mean"` (not the default) divides s by its mean over the token's latents, so that beta is
dimensionless, independent of c and of the gradient's scale, which varies between tokens,
checkpoints and layers; the default "none" is the formula as printed. A token with g = 0 falls
back to plain top-k.

Inference. The gradient needs the next token (a label), which an SAE applied to activations alone
does not have, so `encode` is plain top-k on z. Top-k of z then ReLU equals top-k of pre then ReLU,
so at inference a g-SAE *is* a SAELens `topk` SAE with the same k and is saved as one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
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
        grad_normalisation: Literal["none", "mean"] = Field(
            default="none",
            description="per-token scaling of |d_i . g|: 'none' uses it as the paper prints it; "
            "'mean' divides by its mean over the token's latents (beta dimensionless)",
        )

        @field_validator("multi_topk")
        @classmethod
        def _no_multi_topk(cls, v: bool) -> bool:
            if v:
                raise ValueError("multi_topk is TopK's (Gao et al. section 5.3), not g-SAE's")
            return v

    title = "g-SAE"
    saelens_architecture = "topk"
    requires = (GRADIENT,)

    @torch.no_grad()
    def selection_scores(self, z: Tensor, grad: Tensor) -> Tensor:
        """score_i = z_i + beta * z_i * s_i, s_i = |d_i . g| (optionally over its mean per token)."""
        s = (grad @ self.W_dec.T).abs()
        if self.cfg.grad_normalisation == "mean":
            s = s / s.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return z + self.cfg.beta * z * s

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
        total = mse + self.aux_weight(x) * aux  # AuxK weighted as in TopK (`aux_scale`)
        return LossOutput(total, {"mse": mse, "auxk": aux}, codes, x_hat)

    def saelens_config(self) -> dict:
        # the exported decoder rows have norm 1 / input_scale: SAELens must not rescale by them
        return {**super().saelens_config(), "rescale_acts_by_decoder_norm": False}
