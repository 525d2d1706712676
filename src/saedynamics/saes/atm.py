"""Adaptive Temporal Masking, ATM (Li & Ren 2025, "Time-Aware Feature Selection: Adaptive Temporal
Masking for Stable Sparse Autoencoder Training", ICLR 2025 workshop XAI4Science, arXiv 2510.08855).

Source of the equations. The paper's method section could not be read here (no copy of its body
was reachable; see docs/architectures.md). What follows is the abstract plus the two equations that a
rendering of the paper quotes verbatim, the threshold theta_t = mu_t + c sigma_t and the masking
probability p(masked) = 1 - exp(-r (theta_t - Importance(t)) / theta_t); everything the two leave
open is a config option: the literal reading where there is one, else a value chosen and
measured (below).

Method. An L1-penalised ReLU SAE (the paper's base; Bricken et al. 2023 recipe) whose latents are
masked at random during training:

    pre = (x - b_dec) W_enc + b_enc,   f = ReLU(pre) * M,   x_hat = f W_dec + b_dec
    loss = mean_b |x - x_hat|^2 + lambda(t) * mean_b |f|_1

lambda warms up linearly from 0 over the first `l1_warmup_fraction` of training.

Temporal importance. After each optimiser step, exponential moving averages (rate `ema_beta`) over
the step's codes f of the three quantities the abstract names, per latent i:

    m_i = EMA E_b |f_i|               activation magnitude
    p_i = EMA E_b 1[f_i > 0]          activation frequency
    e_i = EMA E_b |f_i d_i|^2         reconstruction contribution (energy of its share of x_hat)

    Importance_i = m_i p_i e_i                        (`importance = "product"`, default)
                 = m_i/mean(m) + p_i/mean(p) + e_i/mean(e)   (`importance = "sum"`)

Statistical threshold and masking probability (the quoted equations), over the d_sae latents:

    theta = mu + c sigma,   mu = mean_i Importance_i,   sigma = std_i Importance_i (population)
    q_i = 1 - exp(-r (theta - Importance_i) / theta)   if Importance_i < theta, else 0

so a latent far below the threshold is masked with probability up to 1 - exp(-r), one at the
threshold never. q is unchanged when every importance is multiplied by a constant (theta scales
with it), so the units of the statistics and the input scale do not matter. With no statistics yet
(theta <= 0) nothing is masked.

Masking. From the step `mask_warmup_fraction * total` on (the curriculum: the EMAs first see enough
steps to rank latents), every training step (module in training mode) draws one mask per latent,
M_i ~ Bernoulli(1 - q_i), shared by the batch's tokens; before it M = 1.

Inference: no mask (masking is a training procedure): f = ReLU((x - b_dec) W_enc + b_enc),
x_hat = f W_dec + b_dec, which is SAELens `standard` with apply_b_dec_to_input = True.

Init and constraint (Bricken): decoder rows at unit norm, held there with the gradient projected
onto the sphere (spec 0.1 family 1); W_enc = W_dec^T; b_enc = 0; b_dec = geometric median of the
first batch. With unit rows e_i = EMA E_b f_i^2.

Defaults the paper's text would fix but could not be read (docs/architectures.md gives the reasons):
c = 1.0 (theta one standard deviation above the mean importance: nearly every latent is a
candidate, the least important the likeliest); r = 0.1 (a latent far below theta is masked with
probability up to 1 - exp(-0.1) = 0.095; in our runs 6-7% of the latents per step. r = 1 masks
about half of them every step and cost 0.15-0.2 of dictionary recovery on the synthetic organism,
against the paper's claim that ATM keeps reconstruction quality); ema_beta = 0.99;
mask_warmup_fraction = 0.1; lambda = 5.0 (Anthropic's value for inputs scaled to E|x| = sqrt(d));
lr 1e-3 (dictionary_learning's StandardTrainer).
The masks come from a random stream of their own, seeded from the init generator, so a run is
reproducible from its seed and a killed job resumes bitwise.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    mean_squared_error,
    register,
)
from saedynamics.saes.relu import L1Config

STATISTICS = ("ema_magnitude", "ema_frequency", "ema_contribution")


@register("atm")
class ATMSAE(SAE):
    class Config(L1Config):
        ema_beta: float = Field(
            default=0.99, ge=0, lt=1, description="EMA rate of the per-latent statistics"
        )
        importance: Literal["product", "sum"] = Field(
            default="product",
            description="Importance = m p e ('product'), or the sum of the three, each divided "
            "by its mean over latents ('sum')",
        )
        threshold_std: float = Field(
            default=1.0, description="c of the threshold theta = mu + c sigma of the importances"
        )
        mask_rate: float = Field(
            default=0.1,
            gt=0,
            description="r of q = 1 - exp(-r (theta - I) / theta): at most 1 - exp(-r) masked",
        )
        mask_warmup_fraction: float = Field(
            default=0.1, ge=0, le=1, description="fraction of training before masking starts"
        )

    title = "ATM"
    saelens_architecture = "standard"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    apply_b_dec_to_input = True
    default_b_dec_init = "geometric_median"
    base_lr = 1e-3

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        for name in STATISTICS:
            self.register_buffer(name, torch.zeros(d_sae))
        # the mask stream: seeded from the init stream (a loaded SAE, which never masks: 0)
        seed = 0 if generator is None else torch.randint(2**62, (), generator=generator).item()
        self._mask_seed, self._mask_rng = seed, None

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def masking(self, step: TrainStep) -> bool:
        return self.training and step.progress >= self.cfg.mask_warmup_fraction

    @torch.no_grad()
    def importance(self) -> Tensor:
        """Importance_i from the EMAs m (magnitude), p (frequency), e (contribution)."""
        m, p, e = (getattr(self, name) for name in STATISTICS)
        if self.cfg.importance == "product":
            return m * p * e
        tiny = torch.finfo(m.dtype).tiny
        return sum(v / v.mean().clamp_min(tiny) for v in (m, p, e))

    @torch.no_grad()
    def threshold(self, importance: Tensor) -> Tensor:
        """theta = mu + c sigma over latents (population std)."""
        return importance.mean() + self.cfg.threshold_std * importance.std(correction=0)

    @torch.no_grad()
    def mask_probabilities(self) -> Tensor:
        """q_i = 1 - exp(-r (theta - I_i) / theta) below the threshold, 0 above it."""
        importance = self.importance()
        theta = self.threshold(importance)
        if theta <= 0:  # no statistics yet (or c sigma below -mu): nothing to rank by
            return torch.zeros_like(importance)
        shortfall = ((theta - importance) / theta).clamp_min(0)
        return -torch.expm1(-self.cfg.mask_rate * shortfall)

    @torch.no_grad()
    def sample_mask(self) -> Tensor:
        """M_i ~ Bernoulli(1 - q_i), one per latent."""
        keep = 1 - self.mask_probabilities()
        if self._mask_rng is None or self._mask_rng.device != keep.device:
            self._mask_rng = torch.Generator(device=keep.device).manual_seed(self._mask_seed)
        return torch.bernoulli(keep, generator=self._mask_rng)

    def resume_state(self) -> dict:
        state = super().resume_state()
        if self._mask_rng is not None:  # created at the first masked step
            state["mask_rng"] = self._mask_rng.get_state()
        return state

    def load_resume_state(self, state: dict, replayed: list[Tensor]) -> None:
        super().load_resume_state(state, replayed)
        if "mask_rng" in state:
            self._mask_rng = torch.Generator(device=self.W_dec.device)
            self._mask_rng.set_state(state["mask_rng"])

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        codes = self.encode(x)
        masked = torch.zeros((), device=x.device)  # the share of latents masked: the curve shows it
        if self.masking(step):
            mask = self.sample_mask()
            codes, masked = codes * mask, 1 - mask.mean()
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        l1 = codes.sum(dim=-1).mean()
        total = mse + self.cfg.l1_at(step) * l1
        return LossOutput(total, {"mse": mse, "l1": l1, "masked": masked}, codes, x_hat)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        super().after_step(out, x, step)
        f = out.codes.detach()
        batch = (
            f.abs().mean(dim=0),
            (f > 0).float().mean(dim=0),
            f.pow(2).mean(dim=0) * self.W_dec.pow(2).sum(dim=1),
        )
        for name, value in zip(STATISTICS, batch, strict=True):
            getattr(self, name).lerp_(value, 1 - self.cfg.ema_beta)
