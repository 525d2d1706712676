"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

Method. a = ReLU((x - b_dec) W_enc + b_enc) for a batch of B tokens; training keeps the k*B largest
entries of the flattened B x F matrix a and zeroes the rest, so the number of active latents varies
per token with mean exactly k (fewer only if fewer than k*B entries are positive); x_hat = f W_dec
+ b_dec. Loss = mean_b |x - x_hat|^2 + aux_alpha * AuxK (spec section 0.3: the top-aux_k dead
latents model the detached residual). Bussmann's `l1_coeff` (default 0) is left out.

Inference. The batch allocation depends on the other tokens of the batch, so inference uses one
global threshold theta instead: f = ReLU(pre) * 1[pre > theta], theta learned during training from
the batch minimum of the selected (positive) activations. It is stored as the buffer `threshold`
[d_sae] with all entries equal, so that the exported SAE is exactly a SAELens `jumprelu` SAE
(W_enc, b_enc, W_dec, b_dec, threshold; apply_b_dec_to_input True), as SAELens saves BatchTopK.

Choices where the references differ (spec section 3):
- Threshold EMA: SAELens / Bussmann's matryoshka_sae form, rate 0.01 per step from the first step
  (`threshold_rate`, `threshold_start_step`), not dictionary_learning's 0.999 from step 1000: a
  memory of ~100 steps forgets the noisy early values as well, and it gives every trained SAE a
  threshold after its first step, however short the run. Unlike SAELens (which starts the EMA at 0
  and so is biased low for its first few hundred steps) the first update sets theta to the batch
  value, as dictionary_learning does. dictionary_learning's form: threshold_rate 0.001,
  threshold_start_step 1000.
- Before the first update (pitfall 7), theta = 0 and encode() gives the dense ReLU codes, which is
  also what SAELens computes from such a file; the trainer updates theta after every step, so this
  only concerns an untrained SAE.
- Decoder: unit rows with the gradient projected (spec 0.1 family 1; Bussmann, dictionary_learning),
  not SAELens' rescale_acts_by_decoder_norm; then the input-scale fold leaves the pre-activations
  and so theta unchanged. b_enc is used (dictionary_learning, SAELens; Bussmann's is unused,
  pitfall 1); the AuxK residual is detached (pitfall 2); dead latents are counted in tokens
  (`dead_tokens`, pitfall 3); the whole batch is flattened (pitfall 4).
- Init: tied (W_enc = W_dec^T), unit decoder rows, b_enc = 0, b_dec = geometric median of the init
  sample (dictionary_learning). Defaults: aux_k = d_in // 2, aux_alpha = 1/32, lr 2e-4 /
  sqrt(d_sae / 2^14) and Adam (0.9, 0.999), the trainer's (dictionary_learning's rule and betas;
  Bussmann used lr 3e-4, betas (0.9, 0.99): set `lr`, `adam_betas`).

This module also holds the machinery that Mutual Choice and Feature Choice (Ayonrinde 2024) share:
the Zipf density law, its online fit and `aux_zipf` (`ZipfSAE`, `zipf_targets`); see those modules.
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
    auxk_loss,
    mean_squared_error,
    register,
)
from saedynamics.saes.topk import TopKConfig


def batch_topk_codes(pre: Tensor, k: int) -> Tensor:
    """ReLU, then keep the k * n_tokens largest entries of the whole batch (all leading dims)."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(k * (flat.numel() // pre.shape[-1]))
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)


@register("batchtopk")
class BatchTopKSAE(SAE):
    class Config(TopKConfig):
        k: int = Field(
            default=32, gt=0, description="mean active latents per token (k * B per batch)"
        )
        threshold_rate: float = Field(
            default=0.01,
            gt=0,
            le=1,
            description="EMA rate of the inference threshold (SAELens, Bussmann 0.01; "
            "dictionary_learning 0.001)",
        )
        threshold_start_step: int = Field(
            default=0, ge=0, description="first step that updates the threshold (dl: 1000)"
        )

    title = "BatchTopK"
    sparse_codes = True
    saelens_architecture = "jumprelu"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    default_b_dec_init = "geometric_median"
    exported_buffers = ("threshold",)

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.steps_done = self.threshold_updates = 0  # training only: in checkpoints, not SAEs

    def default_lr(self) -> float:
        return 2e-4 / (self.d_sae / 2**14) ** 0.5

    # ---- inference: JumpReLU with the learned threshold ----------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    # ---- training ------------------------------------------------------------------------------

    def train_codes(self, pre: Tensor) -> Tensor:
        """The training allocation: the codes of the whole batch."""
        return batch_topk_codes(pre, self.cfg.k)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> tuple[str, Tensor]:
        aux_k = self.cfg.aux_k or self.d_in // 2
        return "auxk", auxk_loss(x, x_hat, pre, self.W_dec, self.dead_mask(), aux_k)

    def reconstruction_loss(
        self, x: Tensor, codes: Tensor, mse: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(training reconstruction loss, extra terms to log) given the full `mse`; Matryoshka
        overrides it."""
        return mse, {}

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        pre = self.pre_acts(x)
        codes = self.train_codes(pre)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        rec, terms = self.reconstruction_loss(x, codes, mse)
        name, aux = self.aux_loss(x, x_hat, pre)
        total = rec + self.cfg.aux_alpha * aux
        return LossOutput(total, {"mse": mse, **terms, name: aux}, codes, x_hat)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor) -> None:
        super().after_step(out, x)
        if self.steps_done >= self.cfg.threshold_start_step:
            self.update_threshold(out.codes.detach())
        self.steps_done += 1

    def resume_state(self) -> dict:
        counters = {"steps_done": self.steps_done, "threshold_updates": self.threshold_updates}
        return {**super().resume_state(), **counters}

    def load_resume_state(self, state: dict, replayed: list[Tensor]) -> None:
        super().load_resume_state(state, replayed)
        self.steps_done, self.threshold_updates = state["steps_done"], state["threshold_updates"]

    @torch.no_grad()
    def update_threshold(self, codes: Tensor) -> None:
        """theta <- EMA of the smallest selected activation of the batch (one value for all)."""
        smallest = codes.masked_fill(codes <= 0, float("inf")).min().expand(self.d_sae)
        self.ema_threshold_(smallest, where=smallest.isfinite())

    @torch.no_grad()
    def ema_threshold_(self, value: Tensor, where: Tensor | None = None) -> None:
        """threshold <- (1 - rate) threshold + rate value (the value itself at the first update),
        only at the latents `where` (all if None)."""
        value = value.to(self.threshold.dtype)
        if self.threshold_updates > 0:
            value = torch.lerp(self.threshold, value, self.cfg.threshold_rate)
        if where is not None:
            value = torch.where(where, value, self.threshold)
        self.threshold.copy_(value)
        self.threshold_updates += 1


# ---- shared by Mutual Choice and Feature Choice (Ayonrinde 2024) -------------------------------


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
    """BatchTopK machinery plus Ayonrinde's aux_zipf_loss (the form proposed in spec section 8).

    Densities p_i are EMAs (rate `zipf_rate`) of the fraction of a batch's tokens on which latent i
    fires. Latents are ranked by a "demand" density (Mutual Choice: p itself; Feature Choice: the
    density the unconstrained allocation would give) and each gets the Zipf expectation p*_i of
    its rank (`zipf_targets`, total density k per token). Under-utilised latents are
    U = {i : p_i < gamma * p*_i} together with the dead ones, and

        aux_zipf = AuxK (spec 0.3) with U in place of the dead set,

    so with no latent under-utilised it is AuxK exactly. Densities start uniform (k / F).
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
        return self.dead_mask() | (self.density < self.cfg.underused_fraction * self.target_density)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> tuple[str, Tensor]:
        if self.cfg.aux == "auxk":
            return super().aux_loss(x, x_hat, pre)
        aux_k = self.cfg.aux_k or self.d_in // 2
        return "aux_zipf", auxk_loss(x, x_hat, pre, self.W_dec, self.underused_mask(), aux_k)

    def batch_demand(self, out: LossOutput, x: Tensor) -> Tensor:
        """This batch's density that ranks the latents (Mutual Choice: the firing density)."""
        return (out.codes != 0).float().mean(dim=0)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor) -> None:
        super().after_step(out, x)
        rate, n_tokens = self.cfg.zipf_rate, out.codes.shape[0]
        self.density.lerp_((out.codes != 0).float().mean(dim=0), rate)
        self.demand.lerp_(self.batch_demand(out, x), rate)
        # densities below one firing in the EMA's window are not resolved: left out of the fit
        target, exponent = zipf_targets(
            self.demand, self.cfg.k, self.cfg.zipf_exponent, self.cfg.zipf_offset, rate / n_tokens
        )
        self.target_density.copy_(target)
        self.fitted_exponent.fill_(exponent)
