"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Method. Pre-activations pre = (x - b_dec) W_enc + b_enc; keep each token's k largest, then ReLU
(OpenAI's order, also SAELens'; dictionary_learning applies ReLU first, which differs only when fewer
than k pre-activations are positive); x_hat = f W_dec + b_dec. The loss is the reconstruction error
plus alpha * AuxK, which lets the top-k_aux dead latents model the residual so they revive.

Decoder rows are held at unit norm with the gradient projected onto the sphere's tangent space
(spec section 0.1 family 1); b_dec starts at the geometric median of the first batch; W_enc = W_dec^T
at init. Defaults: k_aux = d_in / 2 and alpha = 1/32 (paper, dictionary_learning); lr
2e-4 / sqrt(d_sae / 2^14) (dictionary_learning's rule when unset).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    auxk_loss,
    mean_squared_error,
    register,
)


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class TopKConfig(ArchitectureConfig):
    """k and AuxK: the hyperparameters of every top-k architecture."""

    k: int = Field(default=32, gt=0, description="active latents per token")
    aux_k: int | None = Field(
        default=None, gt=0, description="dead latents used by AuxK; None: d_in // 2"
    )
    aux_alpha: float = Field(default=1 / 32, ge=0, description="weight of the AuxK loss")

    def check_dimensions(self, d_model: int, n_latents: int) -> None:
        if self.k >= n_latents:
            raise ValueError(f"k = {self.k} must be smaller than n_latents = {n_latents}")


@register("topk")
class TopKSAE(SAE):
    Config = TopKConfig

    title = "TopK"
    sparse_codes = True
    saelens_architecture = "topk"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    default_b_dec_init = "geometric_median"

    def default_lr(self) -> float:
        return 2e-4 / (self.d_sae / 2**14) ** 0.5

    def encode(self, x: Tensor) -> Tensor:
        return topk_codes(self.pre_acts(x), self.cfg.k)

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        pre = self.pre_acts(x)
        codes = topk_codes(pre, self.cfg.k)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        aux_k = self.cfg.aux_k or self.d_in // 2
        aux = auxk_loss(x, x_hat, pre, self.W_dec, self.dead_mask(), aux_k)
        total = mse + self.cfg.aux_alpha * aux
        return LossOutput(total, {"mse": mse, "auxk": aux}, codes, x_hat)

    def saelens_config(self) -> dict:
        return {**super().saelens_config(), "k": self.cfg.k}
