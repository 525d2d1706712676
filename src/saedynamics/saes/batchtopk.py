"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

Method (paper section 3). For a batch X of B tokens the encoder pre-activations are
pre = (x - b_dec) W_enc + b_enc and

    f(X) = BatchTopK(ReLU(pre(X)))      keep the k*B largest entries of the flattened B x F matrix,
    x_hat = f W_dec + b_dec,

so the number of active latents varies per token with mean exactly k (fewer only if fewer than k*B
entries are positive). The loss adds the auxiliary loss of Gao et al. 2024 (App. A.2): the top-aux_k
dead latents model the residual e = sg(x - x_hat) as e_hat = sum_{i in I} ReLU(pre_i) d_i, and

    L = mean_b |x - x_hat|^2 + aux_alpha * mean_b |e - e_hat|^2,

both squared errors in the same unit, as the authors' code computes them (`aux_form =
"squared_error"`). dictionary_learning divides the auxiliary error by the residual's variance
(spec 0.3, `aux_form = "normalised"`), which next to an unnormalised reconstruction error weakens
AuxK by that variance (~ the MSE, tens to hundreds here). The term logged as "auxk" is the
normalised one for every aux_form (comparable across architectures). Bussmann's `l1_coeff`
(default 0) is left out.

Inference (section 3). BatchTopK makes a token's codes depend on the rest of its batch, so at
inference the paper replaces it by a JumpReLU with one global threshold theta,

    f(x) = ReLU(pre) * 1[pre > theta],     theta = E_X[ min{ z_ij(X) : z_ij(X) > 0 } ],

the average over a number of batches X of the smallest activation BatchTopK kept in the batch.
The paper says "average"; it does not say which batches. We take the arithmetic mean over the
training batches of the last `threshold_window` (10%) of training, where the SAE is (nearly) the one
exported: a threshold averaged over earlier batches describes a different encoder. Measured on the
demo's layer-2 activations (throwaway script, k = 8, 93 steps): the previous estimate, an EMA with
rate 0.01 from the first step (Bussmann's matryoshka_sae code, SAELens), was 1.62 and gave an
inference L0 of 3.6; the average over the last 10% of batches gave 1.10 and L0 7.9, the final SAE's
own batch minimum averaged over held-out batches 1.10 and L0 8.0. The EMA form stays available
(`threshold_estimate = "ema"`, `threshold_rate`, `threshold_start_step`; dictionary_learning:
rate 0.001 from step 1000). Before the window the threshold follows that EMA, so that an SAE looked
at during training has a usable theta; the window's first batch restarts the average.

theta is the buffer `threshold` [d_sae] with all entries equal, so the exported SAE is exactly a
SAELens `jumprelu` SAE (W_enc, b_enc, W_dec, b_dec, threshold; apply_b_dec_to_input True), as SAELens
saves BatchTopK. theta is in pre-activation units: the decoder rows are unit norm (nothing folded)
and the input-scale fold (W_enc * s, W_dec / s, b_dec / s) leaves the pre-activations and so theta
unchanged.
Before the first update theta = 0 and encode() gives the dense ReLU codes (dictionary_learning's
pitfall 7), which is also what SAELens computes from such a file.

Init and constraint: tied (W_enc = W_dec^T), unit decoder rows held by gradient projection and
renormalisation (Bussmann, dictionary_learning), b_enc = 0, b_dec = geometric median of the init
sample (dictionary_learning; Bussmann starts b_dec at 0). b_enc is used (dictionary_learning,
SAELens; Bussmann's is declared but unused, pitfall 1); the AuxK residual is detached (pitfall 2);
dead latents are counted in tokens (`dead_tokens`, pitfall 3); the whole batch is flattened
(pitfall 4). Defaults: aux_k = d_in // 2, aux_alpha = 1/32, lr 2e-4 / sqrt(d_sae / 2^14) and Adam
(0.9, 0.999) (dictionary_learning's rule and betas; the paper's code used lr 3e-4, betas (0.9, 0.99),
top_k_aux 512, batch 4096: set `lr`, `adam_betas`, `aux_k`). docs/architectures.md lists every
choice.

Mutual Choice, Feature Choice (through `zipf.ZipfSAE`) and Matryoshka subclass `BatchTopKSAE`.
"""

from __future__ import annotations

import math
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
        aux_form: Literal["squared_error", "normalised"] = Field(
            default="squared_error",
            description="AuxK in the reconstruction's unit, aux_alpha * mean_b |e - e_hat|^2 "
            "(the authors' code), or normalised by the residual's variance (dictionary_learning, "
            "spec 0.3)",
        )
        threshold_estimate: Literal["mean", "ema"] = Field(
            default="mean",
            description="inference threshold: mean of the batch minima over the last "
            "threshold_window of training (paper section 3), or their EMA (SAELens, Bussmann's "
            "matryoshka_sae, dictionary_learning)",
        )
        threshold_window: float = Field(
            default=0.1,
            gt=0,
            le=1,
            description="fraction of training, at its end, whose batches the mean threshold averages",
        )
        threshold_rate: float = Field(
            default=0.01,
            gt=0,
            le=1,
            description="EMA rate of the threshold (the ema estimate, and the mean estimate "
            "before its window; SAELens, Bussmann 0.01; dictionary_learning 0.001)",
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
        # training state, in checkpoints but not in saved SAEs: the running average of the
        # threshold's window, and counters of steps and threshold updates
        self.register_buffer("threshold_sum", torch.zeros(d_sae, dtype=torch.float64))
        self.register_buffer("threshold_count", torch.zeros(d_sae, dtype=torch.float64))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

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

    def aux_scale(self, x: Tensor, x_hat: Tensor) -> Tensor | float:
        """The factor that turns the logged AuxK, normalised by the residual's variance, into the
        paper's squared error: mean_b |e - mean_b e|^2, so that scale * AuxK = mean_b |e - e_hat|^2
        (e = x - x_hat detached); 1 with aux_form "normalised"."""
        if self.cfg.aux_form == "normalised":
            return 1.0
        residual = (x - x_hat).detach()
        return (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean()

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
        total = rec + self.cfg.aux_alpha * self.aux_scale(x, x_hat) * aux
        return LossOutput(total, {"mse": mse, **terms, name: aux}, codes, x_hat)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        super().after_step(out, x, step)
        if self.steps_done >= self.cfg.threshold_start_step:
            self.update_threshold(out.codes.detach(), step)
        self.steps_done += 1

    def in_threshold_window(self, step: TrainStep) -> bool:
        """Whether the batch of `step` belongs to the average that estimates theta (the last
        threshold_window of training)."""
        if self.cfg.threshold_estimate != "mean":
            return False
        window = max(1, math.ceil(self.cfg.threshold_window * step.total))
        return step.index >= step.total - window

    @torch.no_grad()
    def update_threshold(self, codes: Tensor, step: TrainStep) -> None:
        """theta <- estimate of E_X[min{z(X) > 0}] (one value for all latents)."""
        smallest = codes.masked_fill(codes <= 0, float("inf")).min().expand(self.d_sae)
        self.estimate_threshold_(smallest, step, where=smallest.isfinite())

    @torch.no_grad()
    def estimate_threshold_(
        self, value: Tensor, step: TrainStep, where: Tensor | None = None
    ) -> None:
        """Fold the statistic `value` [d_sae] of the batch of `step` into theta, at the latents
        `where` (all if None): the running mean inside the threshold window (the EMA before it is
        then forgotten), the EMA otherwise."""
        where = torch.ones_like(value, dtype=torch.bool) if where is None else where
        if not self.in_threshold_window(step):
            self.ema_threshold_(value, where)
            return
        self.threshold_sum += torch.where(where, value.double(), 0.0)
        self.threshold_count += where.double()
        mean = self.threshold_sum / self.threshold_count.clamp_min(1)
        self.threshold.copy_(torch.where(self.threshold_count > 0, mean, self.threshold.double()))
        self.threshold_updates += 1

    @torch.no_grad()
    def ema_threshold_(self, value: Tensor, where: Tensor) -> None:
        """threshold <- (1 - rate) threshold + rate value (the value itself at the first update),
        only at the latents `where`."""
        value = value.to(self.threshold.dtype)
        if self.threshold_updates > 0:
            value = torch.lerp(self.threshold, value, self.cfg.threshold_rate)
        self.threshold.copy_(torch.where(where, value, self.threshold))
        self.threshold_updates += 1
