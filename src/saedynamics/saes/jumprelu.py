"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders", arXiv 2407.14435; Gemma Scope, arXiv 2408.05147). SAELens `jumprelu`.

Method (section 3). pi = W_enc x + b_enc (no b_dec subtracted from the input) and a per-latent
threshold theta > 0:
    JumpReLU_theta(z) = z H(z - theta)                                          (eq. 4)
    f(x) = JumpReLU_theta(W_enc x + b_enc),   x_hat = W_dec f + b_dec            (eq. 8)
    L(x) = |x - x_hat|^2 + lambda |f|_0,   |f|_0 = sum_i H(pi_i - theta_i)       (eqs. 9, 10)
averaged over the batch, lambda warmed up linearly from 0. H has no useful derivative, so both
functions get straight-through estimators, pseudo-derivatives with a kernel K and bandwidth eps
(section 4), here the rectangle K(u) = H(u + 1/2) - H(u - 1/2) = 1[|u| < 1/2] the paper uses:
    d/dtheta JumpReLU_theta(z) = -(theta / eps) K((z - theta) / eps)            (eq. 11)
    d/dtheta H(z - theta)      = -(1 / eps) K((z - theta) / eps)                (eq. 12)
and with respect to z: H(z - theta) for JumpReLU, 0 for H (the L0 term sends no gradient to the
encoder; the reconstruction reaches theta only through eq. 11). Summed over the batch, eq. 12 is
a kernel density estimate of -p(theta), the density of pi_i at the threshold (section 4).
The trained parameter is log theta (appendix J's pseudo-code); the estimators are applied to
theta = exp(log theta), so autograd adds the chain factor theta.

Init (appendix I / Gemma Scope section 3): decoder rows random at unit norm, W_enc = W_dec^T,
b_enc = b_dec = 0, theta = 0.001. Constraint: unit decoder rows, the gradient component parallel
to them removed (shared in `base`). No dead-latent mechanism. Inference: f = pi H(pi - theta); the
export writes `threshold` = theta (SAELens computes ReLU(pi) H(pi - theta), the same for theta > 0).
Folding the input scale leaves pi, hence theta, unchanged (W_enc * s on inputs / s).

Defaults of the main experiment, in the trainer's units: the paper trains on activations scaled
to E|x|^2 = 1 with eps = 0.001 and theta_0 = 0.001; the trainer scales to E|x|^2 of about d_in, so
pre-activations are about sqrt(d_in) larger, and both default to 0.001 sqrt(d_in) (`bandwidth`,
`init_threshold` = None). Adam beta1 = 0, beta2 = 0.999, lr 7e-5; lambda warmed up linearly
(paper: over its first 10,000 steps; here a fraction of training, `l0_warmup_fraction`, as the
other L1/L0 architectures). lambda 1.0 (SAELens `l0_coefficient`; the paper sweeps it). Since
log theta is trained, Adam moves theta by a factor of about exp(lr) per step: lr x steps bounds
how far theta can travel from its init (SAELens issue #494), so short runs need a larger lr, a
larger bandwidth and a closer init (the demo sets them).

Choice the paper leaves open, `l0_input`: eq. 10 applies H to the pre-activations pi ("pre", the
default, as SAELens), whose window |pi - theta| < eps/2 straddles the threshold as the density
estimate needs. Appendix J's pseudo-code applies the step to the JumpReLU output ("magnitude", as
dictionary_learning), where latents just below theta are 0, so only (theta, theta + eps/2) is seen
(and where theta < eps/2, every token on which the latent is off sits in the window at z = 0).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    mean_squared_error,
    register,
)


def rectangle(u: Tensor) -> Tensor:
    """The kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to_threshold(grad: Tensor, threshold: Tensor) -> Tensor:
    return grad.reshape(-1, threshold.shape[-1]).sum(dim=0)


class JumpReLU(torch.autograd.Function):
    """z * 1[z > theta]; d/dz = 1[z > theta], d/dtheta = -(theta / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        grad_z = (z > theta).to(grad.dtype) * grad
        grad_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return grad_z, _sum_to_threshold(grad_theta, theta), None


class Step(torch.autograd.Function):
    """1[z > theta]; d/dz = 0, d/dtheta = -(1 / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return None, _sum_to_threshold(grad_theta, theta), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    class Config(ArchitectureConfig):
        l0_coefficient: float = Field(default=1.0, ge=0, description="lambda of the L0 penalty")
        l0_warmup_fraction: float = Field(
            default=0.05, ge=0, le=1, description="fraction of training over which lambda ramps up"
        )
        bandwidth: float | None = Field(
            default=None,
            gt=0,
            description="STE kernel width eps; None: the paper's 0.001 at E|x|^2 = 1, i.e. "
            "0.001 sqrt(d_in) in the trainer's units",
        )
        init_threshold: float | None = Field(
            default=None,
            gt=0,
            description="theta at init; None: the paper's 0.001 at E|x|^2 = 1, i.e. "
            "0.001 sqrt(d_in) in the trainer's units",
        )
        l0_input: Literal["pre", "magnitude"] = Field(
            default="pre",
            description="what the L0 Step sees: pre-activations (SAELens) or the JumpReLU "
            "output (dictionary_learning)",
        )

    title = "JumpReLU"
    saelens_architecture = "jumprelu"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    apply_b_dec_to_input = False
    default_b_dec_init = "zero"
    base_lr = 7e-5
    default_adam_betas = (0.0, 0.999)

    # eps and theta_0 of the paper (appendix I), for activations scaled to E|x|^2 = 1
    paper_bandwidth: ClassVar[float] = 0.001
    paper_init_threshold: ClassVar[float] = 0.001

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(self.init_threshold)))

    def in_trainer_units(self, value: float | None, paper_value: float) -> float:
        """A configured value, or the paper's (for E|x|^2 = 1) scaled to E|x|^2 = d_in."""
        return value if value is not None else paper_value * math.sqrt(self.d_in)

    @property
    def bandwidth(self) -> float:
        return self.in_trainer_units(self.cfg.bandwidth, self.paper_bandwidth)

    @property
    def init_threshold(self) -> float:
        return self.in_trainer_units(self.cfg.init_threshold, self.paper_init_threshold)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold).to(pre.dtype)

    def l0_coefficient(self, step: TrainStep) -> float:
        return self.cfg.l0_coefficient * step.ramp(self.cfg.l0_warmup_fraction)

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        pre = self.pre_acts(x)
        theta = self.threshold
        codes = JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        z = pre if self.cfg.l0_input == "pre" else codes
        l0 = Step.apply(z, theta, self.bandwidth).sum(dim=-1).mean()
        total = mse + self.l0_coefficient(step) * l0
        return LossOutput(total, {"mse": mse, "l0": l0}, codes, x_hat)

    # ---- saved as SAELens' `threshold`, trained as log_threshold --------------------------------

    def weights(self) -> dict[str, Tensor]:
        out = super().weights()
        out["threshold"] = out.pop("log_threshold").detach().exp()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "threshold" in state_dict:
            state_dict[prefix + "log_threshold"] = state_dict.pop(prefix + "threshold").log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
