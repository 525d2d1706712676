"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014; docs/spec/sae-variants.md section 5). SAELens `gated`.

Method (section 3). The encoder separates which latents fire from how strongly, with one shared
weight:
    x_c = x - b_dec
    pi_gate = x_c W_gate + b_gate                       (decides firing)
    pi_mag  = x_c W_mag + b_mag,  (W_mag)_ij = exp(r_mag,j) (W_gate)_ij   (weight sharing)
    f = 1[pi_gate > 0] * ReLU(pi_mag),  x_hat = f W_dec + b_dec.
Loss = mean_b [ |x - x_hat|^2 + lambda |ReLU(pi_gate)|_1
                + |x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))|^2 ].
The gate is not differentiable, so the third (auxiliary) term is the path by which reconstruction
trains W_gate and b_gate: it decodes the gate's activations through a frozen copy of the decoder,
so that it does not pull the decoder itself. As in the paper's code, dictionary_learning and
SAELens, only the decoding is frozen: b_dec also enters x_c, and through x_c every term (the
auxiliary one included) reaches b_dec. The L1 is not weighted by decoder norms: the decoder rows
are held at unit norm. With the weights shared, the Gated encoder is a JumpReLU of pi_mag with
per-latent threshold b_mag,i - exp(r_mag,i) b_gate,i (the paper's remark, which Jumping Ahead
builds on).

Init: decoder rows random at unit norm, W_gate = W_dec^T, r_mag = b_gate = b_mag = 0,
b_dec = 0. Constraint: unit decoder rows with gradient projection (ConstrainedAdam; shared in
`base`). Inference: the same deterministic gate and magnitude. Saved tensors, SAELens' names:
W_enc (= W_gate), b_gate, r_mag, b_mag, W_dec, b_dec; there is no b_enc. Folding the input scale
(W_gate * s on inputs / s, b_dec / s) leaves both pi's unchanged.

Defaults and their sources:
- lr 3e-4: GDM used it for all Gated runs (spec 5, forum, A. Conmy); dictionary_learning 5e-5.
- lambda 5.0: as `relu_2023`, Anthropic's lambda for inputs scaled to E|x| = sqrt(d), the trainer's
  scaling (dictionary_learning's 0.1 is for unscaled activations); meant to be tuned for L0.
- lambda warm-up over the first 5% of steps (dictionary_learning: 2000 steps; a fraction keeps runs
  of any length comparable).

Choices where the spec is open: the paper's neuron resampling (unverified) is not used
(dictionary_learning and SAELens train Gated SAEs without it); the frozen-decoder auxiliary term
and the unnormalised L1 follow GDM rather than SAELens' norm-weighted variant. Adam betas
(0, 0.999) as GDM (dictionary_learning `GatedSAETrainer`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    mean_squared_error,
    register,
)
from saedynamics.saes.relu import L1Config


@register("gated")
class GatedSAE(SAE):
    Config = L1Config

    title = "Gated"
    saelens_architecture = "gated"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    apply_b_dec_to_input = True
    default_b_dec_init = "zero"
    base_lr = 3e-4
    default_adam_betas = (0.0, 0.999)

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        del self.b_enc  # W_enc is the shared gate weight; the two paths have their own biases
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag) [batch, d_sae]."""
        x_c = x - self.b_dec
        pi_gate = x_c @ self.W_enc + self.b_gate
        pi_mag = x_c @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def pre_acts(self, x: Tensor) -> Tensor:
        """The gate's pre-activations pi_gate, which decide which latents fire."""
        return self.gate_and_magnitude(x)[0]

    @staticmethod
    def codes(pi_gate: Tensor, pi_mag: Tensor) -> Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def encode(self, x: Tensor) -> Tensor:
        return self.codes(*self.gate_and_magnitude(x))

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        codes = self.codes(pi_gate, pi_mag)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        gate = pi_gate.relu()
        l1 = gate.sum(dim=-1).mean()
        aux = mean_squared_error(x, gate @ self.W_dec.detach() + self.b_dec.detach())
        total = mse + self.cfg.l1_at(step) * l1 + aux
        return LossOutput(total, {"mse": mse, "l1": l1, "aux": aux}, codes, x_hat)

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Unit decoder rows, x_hat unchanged: both pi's scale by |d_i| (r_mag does not)."""
        norms = self.W_dec.norm(dim=1)
        self.W_enc.mul_(norms)
        self.b_gate.mul_(norms)
        self.b_mag.mul_(norms)
        self.W_dec.div_(norms[:, None])
