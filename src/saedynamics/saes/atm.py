"""Adaptive Temporal Masking, ATM (Li & Ren 2025, "Time-Aware Feature Selection: Adaptive Temporal
Masking for Stable Sparse Autoencoder Training", arXiv 2510.08855).

Only the abstract was available when this was written (spec section 11, *(abstract only)*): ATM
tracks each latent's activation magnitude, frequency and reconstruction contribution over training,
turns them into an importance score, and masks latents at random with a probability set by
statistical thresholding of the scores; the base is an L1-penalised ReLU SAE. Everything below the
abstract is the spec's *(proposed)* form: **a proposal, to be replaced once the paper's method text
is read**; every constant is a config option.

Method. A ReLU SAE in the recipe of Towards Monosemanticity (Bricken et al. 2023):

    pre = (x - b_dec) W_enc + b_enc,   f = ReLU(pre) * M,   x_hat = f W_dec + b_dec
    loss = mean_b |x - x_hat|^2 + lambda(t) * mean_b |f|_1

with lambda warming up linearly from 0 over the first `l1_warmup_fraction` of training. After each
optimiser step, exponential moving averages (rate `ema_beta`) over the step's codes f:

    m_i = E |f_i|,   p_i = E 1[f_i > 0],   r_i = E |f_i d_i|^2

Importance and masking probability, from the averages normalised by their mean over latents
(n(v)_i = v_i / mean_j v_j, dimensionless, mean 1):

    I_i = (n(m)_i n(p)_i n(r)_i)^(1/3)            (`importance = "product"`; "sum": their mean)
    tau = mean(I) - c std(I)
    q_i = sigmoid((tau - I_i) / (T std(I))) = sigmoid((-c - z_i) / T),   z_i = (I_i - mean I) / std I

From the step `mask_warmup_fraction * total` on, every training step (module in training mode)
draws one mask per latent, M_i ~ Bernoulli(1 - q_i), shared by the batch's tokens (spec: "M_i per
step"); before it M = 1. The population std is used (no Bessel correction).

Inference: deterministic, no mask: f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec,
which is SAELens `standard` with apply_b_dec_to_input = True; ATM is saved as that.

Init and constraint (Bricken): decoder rows at unit norm, held there with the gradient projected
onto the sphere (spec 0.1 family 1); W_enc = W_dec^T; b_enc = 0; b_dec = geometric median of the
first batch.

Choices where the abstract is silent, with reasons:
- Base recipe: Bricken's unit-norm decoder rather than norms folded into the penalty (`relu`), so
  that m_i, r_i and the L1 measure the latent itself: with free decoder norms f_i and |d_i| trade
  off and a latent could look important by scale alone. With unit rows r_i = E f_i^2.
- Statistics are taken from the codes the loss used (masked): the importance is the latent's
  actual recent contribution. A latent masked often therefore loses importance and is masked more;
  this feedback is what makes the masking a selection over time rather than a dropout. Setting
  `mask_warmup_fraction = 1` turns masking off (a plain Bricken ReLU SAE, the ablation baseline).
- Normalisation by the mean over latents: scale-free (the input scale and E|f| do not matter), and
  the start-up bias of the EMAs (they start at 0, no bias correction) cancels in it.
- Importance as the geometric mean of the three normalised statistics: the spec's product form,
  taken to the power 1/3 (same ranking) so that I stays in the units of its factors: a plain
  product cubes their spread, and its few largest values would dominate std(I) and so the
  threshold. "sum" is the spec's other form.
- T is measured in standard deviations of I (the spec's T times std(I)), so q depends only on how
  far a latent's importance lies below the population, not on how spread the importances are:
  with a fixed T a tightly clustered, healthy dictionary would be masked almost at random.
- c = 3.0, the usual outlier cut: only latents whose importance is anomalously low for this
  dictionary are masked, not a fixed share of it. The abstract claims ATM keeps reconstruction
  quality; a dictionary of equally useful latents should then be left almost alone: a latent of
  average importance is masked with probability sigmoid(-c / T) = 6e-6. T = 0.25: q rises from
  0.02 to 0.98 as I goes from 2 to 4 std below the mean. (On the synthetic organism, c = 2,
  T = 0.5 masked a healthy dictionary enough to cost 0.05 of recovery MCC; c = 3, T = 0.25 left
  it within seed noise of masking switched off.)
- ema_beta = 0.99 (spec), i.e. a memory of about 100 steps. mask_warmup_fraction = 0.1: masking
  starts after the L1 warm-up (0.05) and after the EMAs have seen enough steps to rank latents.
- lambda = 5.0: Anthropic's April-2024 value (spec 1b, as `relu` and `relu_2023`), quoted for inputs
  scaled to E|x| = sqrt(d) as the trainer scales them; with unit decoder rows |f|_1 is that
  penalty sum_i f_i |d_i|, so the unit carries over. lr 1e-3: dictionary_learning's
  `StandardTrainer`, the reference code of the Bricken recipe (as `relu_2023`).
- The masks come from a random stream of their own, seeded from the init generator, so a run is
  reproducible from its seed.
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
            description="combine the normalised statistics by geometric mean or arithmetic mean",
        )
        threshold_std: float = Field(default=3.0, ge=0, description="c: tau = mean(I) - c std(I)")
        temperature: float = Field(
            default=0.25, gt=0, description="T, in standard deviations of the importance"
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
        """I_i from the normalised EMAs (n(v) = v / mean v)."""
        stats = torch.stack([getattr(self, name) for name in STATISTICS])
        stats = stats / stats.mean(dim=1, keepdim=True).clamp_min(torch.finfo(stats.dtype).tiny)
        return stats.prod(dim=0).pow(1 / 3) if self.cfg.importance == "product" else stats.mean(0)

    @torch.no_grad()
    def mask_probabilities(self) -> Tensor:
        """q_i = sigmoid((tau - I_i) / (T std I)), tau = mean I - c std I."""
        importance = self.importance()
        std = importance.std(correction=0).clamp_min(torch.finfo(importance.dtype).eps)
        z = (importance - importance.mean()) / std
        return torch.sigmoid((-self.cfg.threshold_std - z) / self.cfg.temperature)

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
        if self.masking(step):
            codes = codes * self.sample_mask()
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        l1 = codes.sum(dim=-1).mean()
        total = mse + self.cfg.l1_at(step) * l1
        return LossOutput(total, {"mse": mse, "l1": l1}, codes, x_hat)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor) -> None:
        super().after_step(out, x)
        f = out.codes.detach()
        batch = (
            f.abs().mean(dim=0),
            (f > 0).float().mean(dim=0),
            f.pow(2).mean(dim=0) * self.W_dec.pow(2).sum(dim=1),
        )
        for name, value in zip(STATISTICS, batch, strict=True):
            getattr(self, name).lerp_(value, 1 - self.cfg.ema_beta)
