"""ReLU SAE with an L1 penalty and neuron resampling: the 2023 recipe of Bricken et al. 2023,
"Towards Monosemanticity: Decomposing Language Models With Dictionary Learning" (Transformer
Circuits Thread; docs/spec/sae-variants.md section 1a). SAELens `standard`, apply_b_dec_to_input.

Method ("Problem Setup: Sparse Autoencoder"):
    x_bar = x - b_d,   f = ReLU(W_e x_bar + b_e),   x_hat = W_d f + b_d
    L = 1/|X| sum_x |x - x_hat|_2^2 + lambda |f|_1
with b_d the tied pre-encoder bias (our b_dec), lambda warmed up linearly from 0 (as `relu`).
Constraint (appendix on autoencoder training): decoder rows (the paper's columns of
W_d) at unit norm, the gradient component parallel to them removed before each step and the rows
renormalised after it (spec 0.1 family 1, shared in `base`); with unit rows the L1 of f is the L1
of each latent's contribution f_i |d_i|. Init: tied (W_e = W_d^T, unit rows), b_e = 0, b_d at the
geometric median of the init sample. Inference: the same deterministic ReLU; no conversion.

Neuron resampling (appendix "Neuron Resampling"), at the training fractions `resample_at`: the
latents that have not fired since the previous resampling (or since the start) are dead. The
current SAE's per-token loss |x - x_hat|^2 is computed on the inputs kept in the buffer described
below; each input gets probability loss^2 / sum loss^2 (`resampling_probabilities`), and for each
dead latent an input is drawn (without replacement, so that no two latents get the same direction);
then
    d_i <- x / |x|,   W_enc[:, i] <- x / |x| * 0.2 * mean_{live j} |W_enc[:, j]|,   b_enc,i <- 0,
and Adam's first and second moments of exactly those entries are zeroed (the optimiser attached by
the trainer). Draws continue the SAE's init RNG stream, so a seed reproduces its resamplings.

Defaults and their sources:
- lambda 5.0: Anthropic's April-2024 lambda (spec 1b), quoted for inputs scaled to E|x| = sqrt(d),
  the trainer's scaling; with unit decoder rows its penalty sum_i f_i |d_i| is this one, so the
  unit carries over. dictionary_learning's 0.1 is for unscaled activations and does not transfer.
- lambda warm-up over the first 5% of steps (as `relu`; dictionary_learning warms up over 2000 steps,
  a fraction keeps runs of any length comparable).
- lr 1e-3: dictionary_learning `StandardTrainer`.
- resampling constants: 0.2 (encoder scale), loss^2 weights, 819,200 scored inputs (spec 1a).

Choices where the paper is unverified or open (spec 1a, 16), in one place:
- Schedule: Bricken resamples at steps 25k, 50k, 75k and 100k; the run length those steps belong to
  is not checked, so the schedule is a fraction of training: four equally spaced resamplings at
  10-40% (`resample_at`), which leaves the remaining 60% (including the trainer's final lr decay)
  for the new latents to train. The trainer's lr schedule is not re-warmed after a resampling
  (dictionary_learning re-warms it; the trainer owns the schedule).
- Dead = no firing since the previous resampling (the brief's definition; dictionary_learning uses
  half the resampling interval). Resampled latents restart their dead-token count.
- Where the inputs come from: a buffer of the most recent training batches, at most
  `resample_sample_tokens` (default 819,200, Bricken's sample size) and only tokens seen since the
  previous resampling; it is scored with the current SAE at the resampling step, as Bricken scores
  a fresh random sample. Recent batches are random draws of the training data (the trainer
  shuffles), so they stand in for "random inputs" without a second read of the activation file,
  which the SAE cannot see; the current batch alone (4096 tokens) would be too small a sample
  when thousands of latents die. The buffer is filled only when a resampling is still ahead, and
  is emptied at each one. It holds references to the trainer's batches, which the seeds of a job
  share: resample_sample_tokens x d_in floats per job (1.7 GB at d_in = 512), in the last window
  before each resampling.
- Weights: Bricken's "loss^2", with the per-token loss taken to be the reconstruction error
  |x - x_hat|^2 (the L1 term says nothing about what the dictionary misses); dictionary_learning
  weights by the unsquared norm |x - x_hat|. The new rows use the input x itself, not x - b_dec,
  as the spec states it.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
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


@register("relu_2023")
class ReLU2023SAE(SAE):
    class Config(L1Config):
        resample_at: tuple[float, ...] = Field(
            default=(0.1, 0.2, 0.3, 0.4),
            strict=False,  # YAML and JSON give lists
            description="fractions of training at which dead latents are resampled; () disables",
        )
        resample_sample_tokens: int = Field(
            default=819_200,
            gt=0,
            description="recent training tokens scored at a resampling (Bricken: 819,200)",
        )
        resample_encoder_scale: float = Field(
            default=0.2, gt=0, description="new encoder row norm / mean live encoder row norm"
        )

        @field_validator("resample_at")
        @classmethod
        def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
            if any(not 0 < f < 1 for f in v) or list(v) != sorted(set(v)):
                raise ValueError(
                    f"resample_at = {list(v)} must be increasing distinct fractions in (0, 1)"
                )
            return v

    title = "ReLU + L1 (2023, resampling)"
    saelens_architecture = "standard"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    apply_b_dec_to_input = True
    default_b_dec_init = "geometric_median"
    base_lr = 1e-3

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        self.generator = generator  # the init stream continues into the resampling draws
        self.register_buffer("fired_since_resample", torch.zeros(d_sae, dtype=torch.bool))
        self.recent_inputs: list[Tensor] = []

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        codes = self.encode(x)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        l1 = codes.sum(dim=-1).mean()
        total = mse + self.cfg.l1_at(step) * l1
        return LossOutput(total, {"mse": mse, "l1": l1}, codes, x_hat)

    # ---- resampling ----------------------------------------------------------------------------

    def resample_steps(self, total: int) -> list[int]:
        return [max(1, round(f * total)) for f in self.cfg.resample_at]

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        """Record which latents fired, keep the batch while a resampling is ahead, and resample at
        the steps of `resample_at`."""
        super().after_step(out, x, step)
        self.fired_since_resample |= (out.codes != 0).any(dim=0)
        steps = self.resample_steps(step.total)
        if any(s >= step.index for s in steps):  # keep inputs while a resampling is ahead
            self.recent_inputs.append(x.detach())  # the trainer's batch, shared by the seeds
            while sum(len(b) for b in self.recent_inputs[1:]) >= self.cfg.resample_sample_tokens:
                self.recent_inputs.pop(0)
        if step.index in steps:
            self.resample(torch.cat(self.recent_inputs)[-self.cfg.resample_sample_tokens :])
            self.recent_inputs = []

    @classmethod
    def kept_input_tokens(cls, cfg) -> int:
        return cfg.resample_sample_tokens

    def resume_state(self) -> dict:
        # the recent inputs are training batches: a checkpoint records how many, not the tensors
        # (up to resample_sample_tokens x d_in floats), and the trainer reads them again
        state = {**super().resume_state(), "replay_batches": len(self.recent_inputs)}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_resume_state(self, state: dict, replayed: list[Tensor]) -> None:
        super().load_resume_state(state, replayed)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.recent_inputs = list(replayed)

    @torch.no_grad()
    def resampling_probabilities(self, inputs: Tensor) -> Tensor:
        """P(input n is drawn) = loss_n^2 / sum_m loss_m^2, loss_n = |x_n - x_hat_n|^2 (float64,
        on the CPU, where the draw happens); uniform if every loss is 0."""
        losses = torch.cat([(b - self(b)).pow(2).sum(dim=-1) for b in inputs.split(4096)])
        weights = losses.double().pow(2).cpu()
        if not weights.sum() > 0:
            weights = torch.ones_like(weights)
        return weights / weights.sum()

    @torch.no_grad()
    def resample(self, inputs: Tensor) -> Tensor:
        """Resample the latents that did not fire since the last resampling from `inputs`;
        return their indices."""
        dead = (~self.fired_since_resample).nonzero().squeeze(1)
        self.fired_since_resample.zero_()
        if len(dead) == 0:
            return dead
        probabilities = self.resampling_probabilities(inputs)
        n = len(dead)
        chosen = torch.multinomial(
            probabilities, n, replacement=n > len(probabilities), generator=self.generator
        )
        directions = inputs[chosen.to(inputs.device)]
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        live = torch.ones(self.d_sae, dtype=torch.bool, device=dead.device)
        live[dead] = False
        live_norm = self.W_enc[:, live].norm(dim=0).mean() if live.any() else 1.0
        self.W_dec[dead] = directions
        self.W_enc[:, dead] = directions.T * self.cfg.resample_encoder_scale * live_norm
        self.b_enc[dead] = 0.0
        self.tokens_since_fired[dead] = 0
        self._reset_adam_moments(dead)
        return dead

    def _reset_adam_moments(self, dead: Tensor) -> None:
        opt = self.optimizer
        if opt is None:
            return
        for param, index in (
            (self.W_dec, (dead,)),
            (self.W_enc, (slice(None), dead)),
            (self.b_enc, (dead,)),
        ):
            state = opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
