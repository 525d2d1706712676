"""The Zipf machinery of Mutual Choice and Feature Choice (Ayonrinde 2024, "Adaptive Sparse
Allocation with Mutual Choice & Feature Choice Sparse Autoencoders", arXiv 2411.02124): each
latent's expected firing density from a Zipf law, and the aux_zipf loss built on it. No
architecture is registered here; `mutual_choice.py` and `feature_choice.py` subclass `ZipfSAE`,
which is BatchTopK (batchtopk.py: allocation, inference threshold, init, constraint) plus what
follows. Spec section 8 marks the Zipf law and aux_zipf as *proposed* (the paper's code is not
released), so each choice below is a config option; docs/architectures.md compares them with the
paper.

Densities. After every step, two EMAs (rate `zipf_rate`, starting uniform at k / F):

    p_i = EMA of the fraction of the batch's tokens on which latent i fires      (`density`)
    d_i = EMA of the density that ranks the latents                              (`demand`)

The demand is p itself for Mutual Choice, and for Feature Choice the density latent i would have
under the unconstrained allocation of the same budget (its own density is its capacity there, so
ranking by it would be circular).

Zipf targets (`zipf_targets`). With r_i the rank of latent i by demand (1 = highest),

    p*_r = k (r + b)^-s / sum_r' (r' + b)^-s,       so that sum_i p*_i = k per token,

b = `zipf_offset` (0: plain Zipf) and s = `zipf_exponent`, or, when that is None, fitted after
every step: the least-squares slope of log d against log(r + b) over the resolved latents (demand
above one firing in the EMA's window, rate / B), clamped at s >= 0 (0 when fewer than two are
resolved). Fitting makes the law the data's own: on equally frequent features it flattens to s ~ 0.
p*_i is `target_density`: for Mutual Choice the density the law expects of latent i, for Feature
Choice its capacity per token (m_i = B p*_i, `feature_choice.capacities`).

aux_zipf (`ZipfSAE.aux_loss`). A latent is under-utilised when its density is below gamma =
`underused_fraction` (0.5) times its target, and

    U = {dead} u {i : p_i < gamma p*_i},      aux_zipf = AuxK (spec 0.3) over U instead of {dead},

in the loss as BatchTopK's AuxK (aux_alpha = 1/32, `aux_form`). With no latent under-utilised it
is AuxK exactly; `aux = "auxk"` gives plain AuxK throughout. gamma = 1 would mark about half the
latents at any time through noise alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from saedynamics.saes.base import ArchitectureConfig, LossOutput, TrainStep, auxk_loss
from saedynamics.saes.batchtopk import BatchTopKSAE


def zipf_targets(
    density: Tensor, k: float, exponent: float | None, offset: float, floor: float
) -> tuple[Tensor, float]:
    """Each latent's expected density under a Zipf law over density ranks, summing to k per token.

        p*_r = k (r + offset)^-s / sum_r' (r' + offset)^-s,   r = 1..F the rank of latent i by density

    With `exponent` None, s is fitted: the least-squares slope of log density against
    log(rank + offset) over the latents whose density exceeds `floor` (clamped at s >= 0; 0 when
    fewer than two qualify). Returns (p* per latent [F], s).
    """
    order = density.argsort(descending=True)
    ranks = torch.arange(1, density.numel() + 1, dtype=torch.float64, device=density.device)
    log_rank = (ranks + offset).log()
    if exponent is None:
        sorted_density = density[order].double()
        valid = sorted_density > floor
        exponent = 0.0
        if valid.sum() >= 2:
            lx = log_rank[valid] - log_rank[valid].mean()
            ly = sorted_density[valid].log()
            exponent = max(0.0, -float((lx * (ly - ly.mean())).sum() / lx.pow(2).sum()))
    law = (-exponent * log_rank).exp()
    law = law * (k / law.sum())
    target = torch.empty_like(law)
    target[order] = law
    return target.to(density.dtype), exponent


class ZipfSAE(BatchTopKSAE):
    """BatchTopK plus Ayonrinde's aux_zipf_loss (the form proposed in spec section 8; the module
    docstring states it): density and demand EMAs, the Zipf targets p*_i fitted to the demand after
    every step, and AuxK over the dead and under-utilised latents. Subclasses choose the demand
    (`batch_demand`) and, for Feature Choice, the allocation.
    """

    class Config(BatchTopKSAE.Config):
        aux: Literal["zipf", "auxk"] = Field(
            default="zipf", description="auxiliary loss: aux_zipf (proposed form) or plain AuxK"
        )
        zipf_exponent: float | None = Field(
            default=None, ge=0, description="Zipf exponent s; None: fitted to the densities"
        )
        zipf_offset: float = Field(
            default=0.0, ge=0, description="Zipf-Mandelbrot rank offset b in (r + b)^-s"
        )
        underused_fraction: float = Field(
            default=0.5,
            gt=0,
            le=1,
            description="gamma: under-utilised below gamma times the Zipf expectation",
        )
        zipf_rate: float = Field(default=0.01, gt=0, le=1, description="EMA rate of densities")

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        uniform = torch.full((d_sae,), cfg.k / d_sae)
        self.register_buffer("density", uniform.clone())  # EMA of firing
        self.register_buffer("demand", uniform.clone())  # EMA of the density that ranks latents
        self.register_buffer("target_density", uniform.clone())  # p*_i
        self.register_buffer("fitted_exponent", torch.zeros((), dtype=torch.float64))

    def underused_mask(self) -> Tensor:
        """U: the dead latents and those with p_i < gamma p*_i."""
        return self.dead_mask() | (self.density < self.cfg.underused_fraction * self.target_density)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> tuple[str, Tensor]:
        """aux_zipf: AuxK over U (`underused_mask`); plain AuxK with aux = "auxk"."""
        if self.cfg.aux == "auxk":
            return super().aux_loss(x, x_hat, pre)
        aux_k = self.cfg.aux_k or self.d_in // 2
        return "aux_zipf", auxk_loss(x, x_hat, pre, self.W_dec, self.underused_mask(), aux_k)

    def batch_demand(self, out: LossOutput, x: Tensor) -> Tensor:
        """This batch's density that ranks the latents (Mutual Choice: the firing density)."""
        return (out.codes != 0).float().mean(dim=0)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        """BatchTopK's update, then the densities and the Zipf targets for the next step."""
        super().after_step(out, x, step)
        rate, n_tokens = self.cfg.zipf_rate, out.codes.shape[0]
        self.density.lerp_((out.codes != 0).float().mean(dim=0), rate)
        self.demand.lerp_(self.batch_demand(out, x), rate)
        # densities below one firing in the EMA's window are not resolved: left out of the fit
        target, exponent = zipf_targets(
            self.demand, self.cfg.k, self.cfg.zipf_exponent, self.cfg.zipf_offset, rate / n_tokens
        )
        self.target_density.copy_(target)
        self.fitted_exponent.fill_(exponent)
