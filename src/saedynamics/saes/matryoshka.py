"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2024), BatchTopK variant.

Method. The latents are split into contiguous groups G_1..G_n (`group_fractions` of d_sae, in
order); prefix g is G_1 u ... u G_g. Codes f come from BatchTopK over all latents (global top k*B
of ReLU((x - b_dec) W_enc + b_enc)); prefix g reconstructs with its own latents only,

    x_hat_g = b_dec + sum_{h <= g} f_{G_h} W_dec[G_h],      x_hat_n = x_hat (the whole dictionary),

and every prefix is trained to reconstruct on its own:

    L = sum_g w_g mean_b |x - x_hat_g|^2 / sum_g w_g  +  aux_alpha * AuxK,

so the first latents must carry the most general features and later groups refine them. AuxK
(spec 0.3) models the detached residual of the full reconstruction, as dictionary_learning and
Bussmann do (not SAELens' optional per-level aux).

Defaults: group_fractions [1/16, 1/16, 1/8, 1/4, 1/2] (Bussmann `main.py`), uniform group weights
(dictionary_learning); group sizes int(fraction * d_sae), the remainder to the last group
(dictionary_learning). Everything else, including inference (the BatchTopK global threshold, EMA
rate 0.01 from the first step, Bussmann's rate), the SAELens `jumprelu` export, tied init with unit
decoder rows, geometric-median b_dec, projection + renormalisation, aux_k = d_in // 2, aux_alpha =
1/32 and lr 2e-4 / sqrt(d_sae / 2^14), is BatchTopK's (see batchtopk.py). The groups act in
training only: inference and export use the whole dictionary.

Choice of loss form (spec section 12): dictionary_learning's weighted form, not Bussmann's mean
over {bias-only, prefix_1..n}. Bussmann's extra bias-only term (x - b_dec)^2 reaches only b_dec and
pulls it to the data mean, fighting the geometric-median init and the reconstructions it serves;
the weighted form has no such term and is in our loss unit (mean over tokens of the summed squared
error). The weights are normalised to sum to 1, so the default is the plain mean over prefixes
(dictionary_learning multiplies by w_g = 1/n and then also averages, a further 1/n that only
rescales the loss relative to AuxK). The "mse" term logged is the full reconstruction's, as for
every architecture; "matryoshka" is the prefix loss that is minimised.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator
from torch import Tensor

from saedynamics.saes import sparse
from saedynamics.saes.base import ArchitectureConfig, mean_squared_error, register
from saedynamics.saes.batchtopk import BatchTopKSAE


def group_sizes(fractions: list[float], n_latents: int) -> list[int]:
    """int(fraction * n_latents) for every group but the last, which takes the rest."""
    sizes = [int(f * n_latents) for f in fractions[:-1]]
    return [*sizes, n_latents - sum(sizes)]


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    class Config(BatchTopKSAE.Config):
        group_fractions: list[float] = Field(
            default=[1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2],
            min_length=1,
            description="fraction of the latents in each nested group, in order; sum 1",
        )
        group_weights: list[float] | None = Field(
            default=None, description="weight of each prefix's reconstruction; None: uniform"
        )

        @model_validator(mode="after")
        def _groups(self):
            fractions, weights = self.group_fractions, self.group_weights
            if any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
                raise ValueError(
                    f"group_fractions = {fractions} must be positive and sum to 1 "
                    f"(sum {sum(fractions):.6g})"
                )
            if weights is not None and (
                len(weights) != len(fractions) or any(w < 0 for w in weights) or sum(weights) <= 0
            ):
                raise ValueError(
                    f"group_weights = {weights} must be {len(fractions)} non-negative numbers "
                    "(one per group) with a positive sum"
                )
            return self

        def check_dimensions(self, d_model: int, n_latents: int) -> None:
            super().check_dimensions(d_model, n_latents)
            self.group_sizes(n_latents)

        def group_sizes(self, n_latents: int) -> list[int]:
            sizes = group_sizes(self.group_fractions, n_latents)
            if min(sizes) < 1:
                raise ValueError(
                    f"group_fractions = {self.group_fractions} give group sizes {sizes} for "
                    f"n_latents = {n_latents}: every group needs at least one latent"
                )
            return sizes

    title = "Matryoshka"

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        sizes = cfg.group_sizes(d_sae)
        self.group_ends = [sum(sizes[: g + 1]) for g in range(len(sizes))]
        weights = cfg.group_weights or [1.0] * len(sizes)
        self.group_weights = [w / sum(weights) for w in weights]

    def prefix_reconstructions(self, codes: Tensor, n_prefixes: int | None = None) -> list[Tensor]:
        """x_hat_g for the first `n_prefixes` prefixes g (all: the last is the full x_hat)."""
        x_hat, start, out = self.b_dec, 0, []
        for end in self.group_ends[:n_prefixes]:
            x_hat = x_hat + sparse.codes_matmul(codes[:, start:end], self.W_dec[start:end])
            out.append(x_hat)
            start = end
        return out

    def reconstruction_loss(
        self, x: Tensor, codes: Tensor, mse: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        inner = self.prefix_reconstructions(codes, len(self.group_ends) - 1)
        errors = [mean_squared_error(x, x_hat) for x_hat in inner] + [mse]
        loss = sum(w * e for w, e in zip(self.group_weights, errors, strict=True))
        return loss, {"matryoshka": loss}
