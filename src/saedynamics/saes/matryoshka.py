"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv 2503.17547, ICML 2025; Nabeshima 2024), BatchTopK variant.

Method (paper section 3). Nested dictionary sizes m_1 < ... < m_n = F: the latents form contiguous
groups G_1..G_n (`group_fractions` of F, in order) and prefix g = G_1 u ... u G_g holds the first
m_g latents. Codes come from BatchTopK over all F latents, f = BatchTopK(ReLU((x - b_dec) W_enc +
b_enc)) (batchtopk.py), and prefix g reconstructs with its own latents only,

    x_hat_g = f_{1:m_g} W_dec[1:m_g] + b_dec,        x_hat_n = x_hat (the whole dictionary).

Every prefix is trained to reconstruct on its own (section 3 loss):

    L = sum_g w_g |x - x_hat_g|^2  +  aux_alpha * AuxK,         w_g = 1 (the paper's plain sum),

in our unit (mean over tokens of the summed squared error), so the first latents must carry the
most general features and later groups refine them. AuxK models the detached residual of the full
reconstruction, as dictionary_learning and the paper's code do, in the reconstruction's unit
(aux_alpha * mean_b |e - e_hat|^2, the authors' code; BatchTopK's `aux_form`).

Alternatives (`prefix_loss`): "mean" divides by sum_g w_g (dictionary_learning's normalised
weights; this module's default before issue 18); "with_bias_only" is the authors' code
(bartbussmann/matryoshka_sae `GlobalBatchTopKMatryoshkaSAE`): the mean over {b_dec alone, prefix_1..n},
(|x - b_dec|^2 + sum_g w_g |x - x_hat_g|^2) / (1 + sum_g w_g). Its bias-only term reaches only b_dec.
`group_weights` weighs the prefixes (dictionary_learning; default 1 each).

Defaults of the main experiment (the authors' `main.py`, Gemma-2-2B): group_fractions
[1/16, 1/16, 1/8, 1/4, 1/2], i.e. prefixes F/16, F/8, F/4, F/2, F (the sizes of the BatchTopK
SAEs it is compared with); group sizes int(fraction * F), the remainder to the last group
(dictionary_learning). Inference is BatchTopK's (the global threshold theta, the average of the
batch minima at the end of training; exported as SAELens `jumprelu`), as are init (tied, unit
decoder rows, geometric-median b_dec), the constraint (projection + renormalisation), aux_k =
d_in // 2, aux_alpha = 1/32 and lr 2e-4 / sqrt(F / 2^14) (see batchtopk.py). The groups act in
training only: inference and export use the whole dictionary. The "mse" term logged is the full
reconstruction's, as for every architecture; "matryoshka" is the prefix loss that is minimised.
docs/architectures.md lists every choice.
"""

from __future__ import annotations

import math
from typing import Literal

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
            default=None, description="weight of each prefix's reconstruction; None: 1 each"
        )
        prefix_loss: Literal["sum", "mean", "with_bias_only"] = Field(
            default="sum",
            description="sum_g w_g |x - x_hat_g|^2 (paper section 3); mean: divided by sum_g w_g "
            "(dictionary_learning); with_bias_only: the mean over {b_dec alone, prefixes} "
            "(the authors' code)",
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
        self.group_weights = [float(w) for w in cfg.group_weights or [1.0] * len(sizes)]

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
        if self.cfg.prefix_loss == "mean":
            loss = loss / sum(self.group_weights)
        elif self.cfg.prefix_loss == "with_bias_only":
            bias_only = mean_squared_error(x, self.b_dec.expand_as(x))
            loss = (bias_only + loss) / (1 + sum(self.group_weights))
        return loss, {"matryoshka": loss}
