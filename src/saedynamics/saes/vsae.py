"""Variational TopK SAE (vSAE; Baker, Li et al. 2025, "Analysis of Variational Sparse
Autoencoders", arXiv 2509.22994; reference code ZachData/SPAR-Variational-Sparse-Autoencoders
`dictionary_learning/trainers/vsae_topk.py` at the paper's commit 8e1581a; docs/spec/sae-variants.md
section 6; docs/architectures.md).

Method. The vSAE "replaces deterministic ReLU gating with stochastic sampling from learned Gaussian
posteriors and incorporates KL divergence regularization toward a standard normal prior" (paper,
abstract). The encoder outputs a diagonal Gaussian q(z | x) = N(mu, diag sigma^2), a sample of it
is sparsified by a top-k on magnitudes, and the closed-form KL(q || N(0, I)) is added to the loss:

    mu = ReLU(W_enc x + b_enc)                   (Anthropic "April" mode: no b_dec subtracted)
    learned variance:  log sigma^2 = clamp(W_var x + b_var, -6, 2)
    fixed variance:    sigma = fixed_std
    z = mu + sigma * eps,  eps ~ N(0, I)         (training only: the reparameterisation trick)
    f = z on the k latents of largest |z| (signed values kept), 0 elsewhere
    x_hat = f W_dec + b_dec
    KL = mean_b 1/2 sum_i (mu_i^2 + sigma_i^2 - 1 - log sigma_i^2)     over ALL F latents
    L = mean_b |x - x_hat|^2 + kl_coeff * min(1, progress / kl_warmup) * KL + aux_alpha * AuxK

Inference is deterministic, z = mu: a top-k on mu >= 0, which is SAELens' `topk` (top-k of the
pre-activation, then ReLU, apply_b_dec_to_input False) with the decoder norms NOT folded into the
encoder: the decoder is unconstrained and the top-k set is not invariant to per-latent rescaling
(SAELens refuses that fold for the same reason). `exported()` therefore folds only the input
scale (`fold_decoder_norm_at_export = False`); the saved SAE (W_enc, b_enc, W_dec, b_dec; cfg k,
rescale_acts_by_decoder_norm False) loads with `sae_lens.SAE.load_from_disk`. The log-variance
encoder (W_var, b_var) shapes training only and is not saved (`training_only_parameters`).

Defaults (reference code unless stated): lr 5e-4; Adam (0.9, 0.999); kl_coeff 1.0 (the value in
the paper's Pythia-70M run, see below); KL warm-up over the first 10% of training; aux_alpha 1/32
with k_aux = d_in / 2, dead latents ranked by |z| with signed values; dead window 10M tokens (the
shared `dead_tokens` default, the reference's at paper time). Init (reference `_init_weights`):
Gaussian directions of norm 0.1, W_enc = W_dec^T, biases 0; W_var Kaiming-uniform (a = 0.01),
b_var = -2 (sigma^2 ~ 0.135). No decoder constraint (April mode).

Where the paper leaves it open or we differ, and why (docs/architectures.md has the table):
- Sampling with a learned variance is the default (`var_flag = "learned"`, the reference's
  var_flag = 1), as the paper's abstract describes the method. The paper's Pythia-70M run
  directory (comprehensive_histogram_analysis/VSAETopK_pythia70m_d8192_k256_lr0.0008_kl1.0_aux0_
  fixed_var at 8e1581a) names the reference's var_flag = 0 ("fixed_var"), which never samples;
  the authors' LessWrong write-up samples N(activation, 1). `var_flag = "fixed"` gives the
  posterior N(mu, fixed_std^2): fixed_std = 1 is the write-up, fixed_std = 0 the reference's
  deterministic code (the run's setting). Its KL is the mu-dependent part, 1/2 sum_i mu_i^2 (the
  reference's form), which equals the full KL at fixed_std = 1; the constant
  1/2 (sigma^2 - 1 - log sigma^2) per latent carries no gradient and is infinite at sigma = 0, so
  it is dropped.
- kl_coeff = 1.0, the paper run's value (the reference's default, 500, is for activations whose
  scale it does not record). The KL is over all latents (not only the top-k, the reference's
  alternative `vsae_topk_masked_kl.py`), which the paper blames for the vSAE's dead latents. On the
  tests' recovery organism (1M tokens; TopK 0.9, a random dictionary 0.44) the dictionary MCC is
  0.65 at kl_coeff 1, 0.48 at 500, 0.89 at 0.1 and 0.89 at 0. mu is clamped to <= 10 inside the
  KL, as in the reference (a guard; mu >= 0 already).
- k = 32, the `topk` default, so that the study compares the two at matched L0; the paper's run
  has k = 256 of 8192 latents (k / F = 1/32) and the reference's default is 0.08 F.
- aux_alpha = 1/32 (reference default) although the paper's run name says aux 0: the study gives
  every top-k architecture the same dead-latent remedy; set aux_alpha 0 for the paper's run.
- lr 5e-4 (reference default); the paper's run name says 8e-4.
- AuxK reuses `base.auxk_loss` on the doubled latents [z, -z] with decoder [W_dec, -W_dec]: ranking
  those by value and keeping the positive part selects each dead latent's |z| and decodes it as
  |z| * sign(z) d = z d, the reference's signed AuxK by |z|, without a second implementation.
- The noise eps has its own random stream per SAE, seeded from the init seed's stream, so a
  seed's training run is reproducible (the trainer seeds init and data order only).
- A latent fires when its training code (from the sampled z) is non-zero (the reference: when its
  batch sum is positive, which a negative code does not count), so the dead-latent statistics and
  AuxK see the noisy selection the loss sees.
- b_dec starts at 0 (reference, April mode); `b_dec_init` can change it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
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
from saedynamics.saes.topk import TopKConfig

LOG_VAR_RANGE = (-6.0, 2.0)  # reference clamp of log sigma^2
MU_CLAMP = 10.0  # reference clamp of mu inside the KL


@register("vsae")
class VariationalSAE(SAE):
    class Config(TopKConfig):
        k: int = Field(default=32, gt=0, description="latents kept per token (by |z|)")
        var_flag: Literal["learned", "fixed"] = Field(
            default="learned",
            description="learned: log-variance encoder, z ~ N(mu, sigma^2) in training; "
            "fixed: sigma = fixed_std",
        )
        fixed_std: float = Field(
            default=1.0,
            ge=0,
            description="sigma with var_flag fixed (1: the authors' write-up; 0: the reference "
            "code's deterministic fixed_var)",
        )
        log_var_init: float = Field(default=-2.0, description="initial bias of log sigma^2")
        kl_coeff: float = Field(default=1.0, ge=0, description="weight of the KL term")
        kl_warmup_fraction: float = Field(
            default=0.1, ge=0, le=1, description="fraction of training over which the KL ramps up"
        )

    title = "Variational TopK"
    sparse_codes = True
    saelens_architecture = "topk"
    unit_norm_decoder = False
    fold_decoder_norm_at_export = False  # the fold would change the top-k set: norms kept
    # the log-variance encoder shapes training only: the saved SAE is SAELens' topk
    training_only_parameters = ("W_var", "b_var")
    decoder_init_norm = 0.1
    apply_b_dec_to_input = False
    base_lr = 5e-4

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        with torch.no_grad():  # the reference's init: Gaussian directions of norm 0.1, tied
            w = torch.randn(d_sae, d_in, generator=generator)
            w = w / w.norm(dim=1, keepdim=True) * self.decoder_init_norm
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
        if cfg.var_flag == "learned":
            w = torch.empty(d_sae, d_in)
            nn.init.kaiming_uniform_(w, a=0.01, generator=generator)  # reference: a = 0.01
            self.W_var = nn.Parameter(w.T.clone())
            self.b_var = nn.Parameter(torch.full((d_sae,), cfg.log_var_init))
        # the sampling noise has its own stream, seeded from the init stream: reproducible per seed
        self.noise_seed = (
            None if generator is None else int(torch.randint(2**60, (), generator=generator))
        )
        self._noise_draws = 0

    def mean(self, x: Tensor) -> Tensor:
        """mu = ReLU(W_enc x + b_enc), the posterior mean (and the code before the top-k)."""
        return self.pre_acts(x).relu()

    def log_var(self, x: Tensor) -> Tensor:
        """Learned log sigma^2 per latent [batch, d_sae]."""
        return (x @ self.W_var + self.b_var).clamp(*LOG_VAR_RANGE)

    def noise(self, like: Tensor) -> Tensor:
        """eps ~ N(0, I) shaped like `like`, from this SAE's own stream (global RNG if unseeded)."""
        if self.noise_seed is None:
            return torch.randn_like(like)
        # a fresh generator per draw: the state is one integer, so copies need no device generator
        rng = torch.Generator(like.device).manual_seed(self.noise_seed + self._noise_draws)
        self._noise_draws += 1
        return torch.randn(like.shape, generator=rng, device=like.device, dtype=like.dtype)

    def resume_state(self) -> dict:
        return {**super().resume_state(), "noise_draws": self._noise_draws}

    def load_resume_state(self, state: dict, replayed: list[Tensor]) -> None:
        super().load_resume_state(state, replayed)
        self._noise_draws = state["noise_draws"]

    def sparsify(self, z: Tensor) -> Tensor:
        """Keep each row's k entries of largest |z|, with their signs."""
        indices = z.abs().topk(self.cfg.k, dim=-1).indices
        return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))

    def encode(self, x: Tensor) -> Tensor:
        return self.sparsify(self.mean(x))

    def kl(self, mu: Tensor, log_var: Tensor | None) -> Tensor:
        """Closed-form KL(N(mu, sigma^2) || N(0, 1)) summed over latents, mean over tokens
        (fixed variance: its mu-dependent part 1/2 sum mu^2, see the module docstring)."""
        mu2 = mu.clamp(max=MU_CLAMP).pow(2)
        if self.cfg.var_flag == "learned":
            return 0.5 * (mu2 + log_var.exp() - 1 - log_var).sum(dim=-1).mean()
        return 0.5 * mu2.sum(dim=-1).mean()

    def kl_scale(self, step: TrainStep) -> float:
        return step.ramp(self.cfg.kl_warmup_fraction)

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        mu = self.mean(x)
        if self.cfg.var_flag == "learned":
            log_var = self.log_var(x)
            z = mu + self.noise(mu) * (0.5 * log_var).exp()
        else:
            log_var = None
            z = mu + self.noise(mu) * self.cfg.fixed_std if self.cfg.fixed_std > 0 else mu
        codes = self.sparsify(z)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        kl = self.kl(mu, log_var)
        aux = self.signed_auxk(x, x_hat, z)
        total = mse + self.cfg.kl_coeff * self.kl_scale(step) * kl + self.cfg.aux_alpha * aux
        return LossOutput(total, {"mse": mse, "kl": kl, "auxk": aux}, codes, x_hat)

    def signed_auxk(self, x: Tensor, x_hat: Tensor, z: Tensor) -> Tensor:
        """AuxK over dead latents ranked by |z|, decoded with their signs: `base.auxk_loss` on the
        latents [z, -z] with decoder [W_dec, -W_dec] (module docstring)."""
        dead = self.dead_mask()
        if not dead.any():
            return x.new_zeros(())
        doubled = (torch.cat([z, -z], dim=-1), torch.cat([self.W_dec, -self.W_dec]))
        k_aux = self.cfg.aux_k or self.d_in // 2
        return auxk_loss(x, x_hat, *doubled, torch.cat([dead, dead]), k_aux)

    # ---- export --------------------------------------------------------------------------------

    def fold_decoder_norm(self) -> None:
        raise NotImplementedError(
            "vsae: folding decoder norms into the encoder changes the top-k set; the exported "
            "SAE keeps its decoder norms"
        )

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        if self.cfg.var_flag == "learned":
            self.W_var.mul_(scale)

    def saelens_config(self) -> dict:
        return {**super().saelens_config(), "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
