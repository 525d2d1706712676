"""ReLU SAE with an L1 penalty weighted by decoder norms: Anthropic's "Circuits Updates - April
2024: Update on how we train SAEs" (transformer-circuits.pub/2024/april-update, section "Training
SAEs"; docs/spec/sae-variants.md section 1b). SAELens `standard` with apply_b_dec_to_input=False.

Method. No pre-encoder bias is subtracted from the input:
    f = ReLU(W_enc x + b_enc),   x_hat = W_dec f + b_dec
    L = E_x [ |x - x_hat|_2^2 + lambda sum_i f_i |W_dec,i|_2 ]
(the expectation is the batch mean). Because the penalty includes each decoder norm, the decoder
is left unconstrained and cannot shrink the codes for free.

Defaults of the update's recipe: lambda = 5 (2 to 10 tried), warmed up linearly from 0 over the
first 5% of training; Adam (0.9, 0.999) without weight decay, lr 5e-5; the lr decays linearly to 0
over the last 20% and gradients are clipped at norm 1 (the trainer's `lr_decay_fraction` and
`grad_clip_norm`); inputs scaled to E|x| = sqrt(d) (the trainer's `input_scaling`).
Init: decoder columns in random directions at a fixed norm, the update's range 0.05 to 1: 0.1,
as SAELens; W_enc = W_dec^T; biases 0 (`b_dec_init` can start b_dec at the data's median instead,
which matters where the residual stream is dominated by a constant offset, as early in training).
No resampling or other dead-latent mechanism.

Inference: at export the decoder norms are folded into the encoder (f_i |d_i|, d_i / |d_i|), which
leaves x_hat and the penalty unchanged and gives unit decoder rows, as SAELens does.
"""

from __future__ import annotations

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


class L1Config(ArchitectureConfig):
    """lambda and its warm-up: the hyperparameters of every L1-penalised architecture."""

    l1_coefficient: float = Field(default=5.0, ge=0, description="lambda of the L1 penalty")
    l1_warmup_fraction: float = Field(
        default=0.05, ge=0, le=1, description="fraction of training over which lambda ramps up"
    )

    def l1_at(self, step: TrainStep) -> float:
        """lambda at this step of its linear warm-up."""
        return self.l1_coefficient * step.ramp(self.l1_warmup_fraction)


@register("relu")
class ReLUSAE(SAE):
    Config = L1Config

    title = "ReLU + L1 (April 2024)"
    saelens_architecture = "standard"
    unit_norm_decoder = False
    decoder_init_norm = 0.1
    apply_b_dec_to_input = False
    base_lr = 5e-5

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        codes = self.encode(x)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        l1 = (codes * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        total = mse + self.cfg.l1_at(step) * l1
        return LossOutput(total, {"mse": mse, "l1": l1}, codes, x_hat)
