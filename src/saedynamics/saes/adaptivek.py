"""AdaptiveK SAE (Yao, Zhang & Du 2025, "AdaptiveK: Complexity-Driven Sparse Autoencoders for
Interpretable Language Model Representations", arXiv 2508.17320, ACL Findings 2026; reference code
hiyukie/adaptiveK 3d03020 `dictionary_learning/trainers/dynamic_topk.py`; docs/spec/sae-variants.md
section 7; docs/architectures.md).

Method. A linear probe reads how complex the input's context is, and the SAE spends more latents on
more complex contexts:

    s(x) = clamp(w . x + b, 0, 10)                                     the probe's complexity score
    k(x) = round(clamp(k_min + sigmoid(6 (s / 10 - 0.5)) (k_max - k_min), k_min, k_max))
    a = ReLU((x - b_dec) W_enc + b_enc);   f = a on each token's k(x) largest latents
    x_hat = f W_dec + b_dec
    L_SAE = mean_{b,j} (x - x_hat)^2 + l1_weight * mean_b |f|_1 / mean_b |x| + aux_alpha * AuxK

k is not differentiable, so the probe gets no gradient from L_SAE. Training has three phases:
(1) in `init_from_sample`, the probe is fitted by closed-form ridge regression (bias unregularised,
lambda chosen by 5-fold cross-validation over {0.01, 0.1, 1, 10, 100, 1000}, scored by the RMSE of
the clamped scores). The paper writes the ridge loss as 1/n sum (y - w.x - b)^2 + lambda/2 |w|^2
but its closed form as w = (A^T A + lambda I)^-1 A^T y, which is that of sum (...)^2 + lambda |w|^2;
we follow the closed form, as the reference computes it. (2) Until `phase_ratio` of training,
L_SAE alone, probe frozen. (3) Then jointly
L_SAE + probe_weight * (MSE(s, y) + lambda |w|^2 / 2 + c_dev (|w - w0| + |b - b0|)), where
(w0, b0) is the ridge fit and c_dev starts at 0.2 and is multiplied by 0.8 (floor 0.01) when the
probe loss fell by more than 5% over the last 3 joint steps, else by 1.2 (ceiling 0.5).
Inference: s -> k -> per-token top-k, batch-independent; the probe (probe_w [d_in], probe_b [1])
is part of the saved SAE, which only saedynamics loads (SAELens has no such architecture).

Defaults and their sources (reference): k_min 20, k_max 320, l1_weight 0.005, probe_weight 0.05,
phase_ratio 0.9, lr 1e-3 (its sae_lr = probe_lr), aux_alpha 1/32 with k_aux = d_in / 2. Init:
b_dec at the geometric median of the init sample, W_enc = W_dec^T, unit decoder rows held by
gradient projection and renormalisation (spec 0.1 family 1).

Choices where the paper cannot be followed here or leaves it open:
- The complexity target. The reference regresses GPT-4.1-mini ratings (0-10) of each context's
  complexity, which cannot be produced offline for every checkpoint. We use the `lm_entropy` column:
  the entropy (nats) of the checkpoint's own next-token distribution at the token, i.e. how
  uncertain the language model itself is about what follows that context, a label available for
  every token and every checkpoint. It is mapped to the probe's 0-10 range by min-max over the
  init sample (targets outside it are clamped), so the map adapts to each checkpoint, whose
  entropies shift as the LM trains; an init sample with constant entropy (no information) gives
  every token the middle score 5. The range is kept (target_lo, target_hi) for the joint phase.
- All tokens, not one last-token state per context (the reference's data): the study's
  activations are per token, and the entropy label is per token too.
- The cross-validation folds are interleaved (row i in fold i mod 5) over the init sample, which
  the trainer already draws in shuffled order; the final fit uses the whole sample (the reference
  fits on an 80% split). The ridge lambda is in the reference's unit (added to X^T X of the raw
  sums) and is kept (ridge_lambda) for the joint phase's L2 term.
- The probe trains with the SAE's optimiser (one Adam, the SAE's lr: the reference's two
  learning rates are equal) and under the trainer's single gradient-norm clip, where the reference
  clips SAE and probe separately; in phases 1-2 its gradient is None, so Adam leaves it unchanged.
- AuxK is the canonical `base.auxk_loss` (detached residual; the reference does not detach it) and
  the dead window is the shared `dead_tokens` (the reference uses 10k tokens), so that dead
  fractions compare across the study's architectures.
- The reconstruction term is the element mean, as in the reference (spec 0.6); the logged "mse"
  is that element mean.
"""

from __future__ import annotations

from collections import deque

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    auxk_loss,
    mean_squared_error,
    register,
)
from saedynamics.saes.topafa import keep_top_ranks

SCORE_MAX = 10.0  # the probe's score range [0, 10] (the reference's rating scale)
RIDGE_LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
CV_FOLDS = 5
# the reference's adaptive weight of the probe's deviation from its ridge fit
DEVIATION_INIT, DEVIATION_RANGE, DEVIATION_WINDOW, DEVIATION_DROP = 0.2, (0.01, 0.5), 3, 0.05


def ridge_fit(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Closed-form ridge, bias unregularised: argmin |y - x w - b|^2 + lam |w|^2 (float64)."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc = x - x_mean
    gram = xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, xc.T @ (y - y_mean))
    return w, y_mean - x_mean @ w


def ridge_cv(x: Tensor, y: Tensor, lambdas=RIDGE_LAMBDAS, folds=CV_FOLDS) -> float:
    """The lambda of least mean held-out RMSE of the clamped scores (first on ties)."""
    fold = torch.arange(len(x), device=x.device) % folds
    rmse = torch.zeros(len(lambdas), dtype=torch.float64)
    for f in range(folds):
        train, held = fold != f, fold == f
        for i, lam in enumerate(lambdas):
            w, b = ridge_fit(x[train], y[train], lam)
            pred = (x[held].double() @ w + b).clamp(0, SCORE_MAX)
            rmse[i] += (pred - y[held].double()).pow(2).mean().sqrt().cpu() / folds
    return lambdas[int(rmse.argmin())]


@register("adaptivek")
class AdaptiveKSAE(SAE):
    class Config(ArchitectureConfig):
        k_min: int = Field(default=20, gt=0, description="k at the lowest complexity score")
        k_max: int = Field(default=320, gt=0, description="k at the highest complexity score")
        l1_weight: float = Field(
            default=0.005, ge=0, description="weight of mean_b |f|_1 / mean_b |x|"
        )
        probe_weight: float = Field(
            default=0.05, ge=0, description="weight of the probe's loss in the joint phase"
        )
        phase_ratio: float = Field(
            default=0.9, ge=0, le=1, description="fraction of training before the joint phase"
        )
        aux_k: int | None = Field(
            default=None, gt=0, description="dead latents used by AuxK; None: d_in // 2"
        )
        aux_alpha: float = Field(default=1 / 32, ge=0, description="weight of the AuxK loss")

        @model_validator(mode="after")
        def _k_range(self):
            if self.k_min > self.k_max:
                raise ValueError(f"k_min = {self.k_min} must not exceed k_max = {self.k_max}")
            return self

        def check_dimensions(self, d_model: int, n_latents: int) -> None:
            if self.k_max >= n_latents:
                raise ValueError(
                    f"k_max = {self.k_max} must be smaller than n_latents = {n_latents}"
                )

    title = "AdaptiveK"
    sparse_codes = True
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    default_b_dec_init = "geometric_median"
    base_lr = 1e-3
    requires = ("lm_entropy",)

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        self.probe_w = nn.Parameter(torch.zeros(d_in))
        self.probe_b = nn.Parameter(torch.zeros(1))
        # training state: the ridge fit, its lambda, and the entropy range mapped to [0, 10]
        self.register_buffer("probe_w0", torch.zeros(d_in))
        self.register_buffer("probe_b0", torch.zeros(1))
        self.register_buffer("ridge_lambda", torch.zeros(()))
        self.register_buffer("target_lo", torch.zeros(()))
        self.register_buffer("target_hi", torch.zeros(()))
        self.deviation_weight = DEVIATION_INIT
        self._probe_losses: deque[float] = deque(maxlen=DEVIATION_WINDOW)

    # ---- the probe and the k map ---------------------------------------------------------------

    def score(self, x: Tensor) -> Tensor:
        """The probe's complexity score s(x) in [0, 10], per token."""
        return (x @ self.probe_w + self.probe_b).clamp(0, SCORE_MAX)

    def k_of(self, score: Tensor) -> Tensor:
        """k per token from the score (integer tensor)."""
        lo, hi = self.cfg.k_min, self.cfg.k_max
        k = lo + torch.sigmoid(6 * (score / SCORE_MAX - 0.5)) * (hi - lo)
        return k.clamp(lo, hi).round().long()

    def complexity(self, entropy: Tensor) -> Tensor:
        """The probe's target: entropy min-max mapped by the init sample's range to [0, 10]."""
        span = self.target_hi - self.target_lo
        if span <= 0:
            return torch.full_like(entropy, SCORE_MAX / 2)
        return ((entropy - self.target_lo) / span * SCORE_MAX).clamp(0, SCORE_MAX)

    def joint_phase(self, step: TrainStep) -> bool:
        """Whether `step` is in phase 3 (probe trained jointly): from `phase_ratio` of training."""
        return step.index >= int(step.total * self.cfg.phase_ratio)

    # ---- the SAE -------------------------------------------------------------------------------

    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, codes): the ReLU activations and each token's top-k(x) of them."""
        a = self.pre_acts(x).relu()
        with torch.no_grad():
            k = self.k_of(self.score(x))
        # (k_max < d_sae in a validated study; the min keeps a directly built SAE usable)
        ranked = a.topk(min(self.cfg.k_max, self.d_sae), dim=-1).indices
        return a, keep_top_ranks(a, ranked, k)

    def encode(self, x: Tensor) -> Tensor:
        return self._codes(x)[1]

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        a, codes = self._codes(x)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat) / self.d_in
        l1 = codes.abs().sum(dim=-1).mean() / x.norm(dim=-1).mean()
        aux = auxk_loss(x, x_hat, a, self.W_dec, self.dead_mask(), self.cfg.aux_k or self.d_in // 2)
        total = mse + self.cfg.l1_weight * l1 + self.cfg.aux_alpha * aux
        terms = {"mse": mse, "l1": l1, "auxk": aux}

        joint = self.joint_phase(step)
        if extras is None or "lm_entropy" not in extras:
            if joint:
                raise ValueError("adaptivek: the joint phase needs extras['lm_entropy']")
            return LossOutput(total, terms, codes, x_hat)
        target = self.complexity(extras["lm_entropy"].float())
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):  # frozen before
            probe = (self.score(x) - target).pow(2).mean()
            probe = probe + self.ridge_lambda * self.probe_w.pow(2).sum() / 2
            b_shift = (self.probe_b - self.probe_b0).abs().sum()
            deviation = (self.probe_w - self.probe_w0).norm() + b_shift
        terms.update(probe=probe, probe_deviation=deviation)  # logged in both phases
        if joint:
            total = total + self.cfg.probe_weight * (probe + self.deviation_weight * deviation)
        return LossOutput(total, terms, codes, x_hat)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        """In the joint phase, adapt the deviation weight to the probe loss's recent trend."""
        super().after_step(out, x, step)
        if not self.joint_phase(step) or "probe" not in out.terms:
            return
        self._probe_losses.append(out.terms["probe"].item())
        if len(self._probe_losses) == DEVIATION_WINDOW and self._probe_losses[0] > 0:
            drop = (self._probe_losses[0] - self._probe_losses[-1]) / self._probe_losses[0]
            factor = 0.8 if drop > DEVIATION_DROP else 1.2
            lo, hi = DEVIATION_RANGE
            self.deviation_weight = min(hi, max(lo, self.deviation_weight * factor))

    def resume_state(self) -> dict:
        adaptive = {
            "deviation_weight": self.deviation_weight,
            "probe_losses": [*self._probe_losses],
        }
        return {**super().resume_state(), **adaptive}

    def load_resume_state(self, state: dict, replayed: list[Tensor]) -> None:
        super().load_resume_state(state, replayed)
        self.deviation_weight = state["deviation_weight"]
        self._probe_losses.clear()
        self._probe_losses.extend(state["probe_losses"])

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> None:
        """b_dec (base), then the entropy range and the ridge probe (cross-validated lambda)."""
        super().init_from_sample(x, extras)
        if extras is None or "lm_entropy" not in extras:
            raise ValueError("adaptivek: init_from_sample needs extras['lm_entropy']")
        entropy = extras["lm_entropy"].float()
        self.target_lo.copy_(entropy.min())
        self.target_hi.copy_(entropy.max())
        y = self.complexity(entropy)
        lam = ridge_cv(x, y)
        w, b = ridge_fit(x, y, lam)
        self.ridge_lambda.fill_(lam)
        for param, buffer, value in (
            (self.probe_w, self.probe_w0, w),
            (self.probe_b, self.probe_b0, b),
        ):
            param.copy_(value.reshape(param.shape))
            buffer.copy_(value.reshape(param.shape))

    # ---- export --------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Trained on x * scale: the raw probe weight is scale * w (the score is unchanged)."""
        super().fold_input_scale(scale)
        self.probe_w.mul_(scale)
        self.probe_w0.mul_(scale)
