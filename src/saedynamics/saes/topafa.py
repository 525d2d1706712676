"""top-AFA SAE (Lee, Davies, Canby & Hockenmaier 2025, "Evaluating and Designing Sparse
Autoencoders by Approximating Quasi-Orthogonality", arXiv 2503.24277; reference code
SewoongLee/top-afa-sae 1c7a683, `training/sae.py::TopAFASAE`, `training/config.py`,
`training/main.ipynb`; docs/spec/sae-variants.md section 10; docs/architectures.md).

Method. Under the linear-representation and superposition hypotheses the dictionary atoms are
epsilon-quasi-orthogonal, so the norm of a sparse code approximates the norm of the dense vector it
encodes, |f| ~ |z| (the paper's approximate feature activation, AFA). top-AFA uses this in place of
a fixed k: each token keeps its largest activations until the kept code's norm is nearest to the
norm of its input, and a norm-matching loss L_AFA pulls |f| towards |z|:

    x_c = x - b_dec;   a = ReLU(x_c W_enc)                       (no encoder bias)
    s_i = (a_i |d_i|)^2,  sorted: s_(1) >= s_(2) >= ... ;   c_j = sqrt(s_(1) + ... + s_(j))
    k = argmin_{1 <= j <= F-1} |c_j - |x_c||   (the first j on a tie; the reference sets
                                              c_F = 1e8, so k = F never wins)
    f = a on the k top-ranked latents, 0 elsewhere
    x_hat = f W_dec + b_dec
    L = mean_{b,j} (x_hat - x)^2 + aux_penalty * AuxK + afa_coeff * L_AFA
    L_AFA = mean_b (|f| - |target|)^2,   target = x_c (default) or x (the paper's |z|)

With unit decoder rows s_i = a_i^2; the |d_i| factor keeps the selection exact when they are not.
Inference is the same per-token selection (batch-independent); SAELens has no such architecture,
so saved SAEs (W_enc, W_dec, b_dec) load with `saedynamics.saes.load` only.

Defaults (the paper's main experiment, GPT-2 small, 16 x 768 latents, reference config): lr 3e-4,
Adam (0.9, 0.99), aux_penalty 1/32, afa_coeff 1/32 (the middle of the sweep
{1/128, 1/64, 1/32, 1/24, 1/16}; the reference default 0 is its plain-TopK baseline), no cap on k.
Init: W_enc = W_dec^T with unit decoder rows; decoder rows held at unit norm with the gradient
projected (spec 0.1 family 1).

Where we differ, and why (docs/architectures.md has the table):
- L_AFA's target is |x - b_dec| by default (`afa_target = "centred"`), the norm the selection
  matches; the paper and reference write the un-centred |z| = |x| (`afa_target = "input"`). The
  reference standardises every token (`input_unit_norm`: zero mean over dims, unit std), which
  removes the activations' constant offset and makes |x| the same for every token; our scalar
  input scaling keeps the offset, and the un-centred target then makes the code carry it: on the
  demo's step-16 checkpoint it gave L0 1 at FVU 1.73 with 82% dead latents, the centred target
  L0 39 at FVU 0.15; at step 1000, FVU 0.23 against 0.14.
- b_dec starts at the geometric median of the init sample (the reference: 0), for the same reason:
  with b_dec = 0 a large offset inflates every token's k at the start of training.
- No per-token standardisation: inputs use the study's scalar `input_scaling`, as for every
  architecture, so k and the AFA term are computed in scaled units.
- AuxK is the canonical form of spec 0.3 (`base.auxk_loss`: detached residual, normalised by its
  variance, k_aux = d_in / 2, top dead latents by a) rather than the reference's un-normalised,
  un-detached Bussmann form; the dead window is the shared `dead_tokens` (reference: 5 batches).
- The reconstruction term is the element mean, as in the reference (spec 0.6: 1/d_in of the
  summed form the other architectures use); the logged "mse" term is that element mean.
- `k_max` optionally caps k (a top-k_max instead of a full sort); the default is no cap, since
  the paper's competitive top-AFA SAEs run at L0 of about 2 d_model (1,579-1,973 at d = 768).
- Expect dense codes where F is not >> d: on the tests' recovery organism (32 latents in 16
  dims, 3 active) the codes settle at L0 11-14 and the dictionary MCC at 0.54 (TopK 0.9), since a
  +-orthonormal basis meets |f| = |x| exactly and the norm match is the only sparsity pressure.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from saedynamics.saes import sparse
from saedynamics.saes.base import (
    SAE,
    ArchitectureConfig,
    LossOutput,
    TrainStep,
    auxk_loss,
    mean_squared_error,
    register,
)


def keep_top_ranks(acts: Tensor, ranked: Tensor, k: Tensor) -> Tensor:
    """Per row b, keep acts at the first k[b] of the latents `ranked` (best first); zero the rest.

    The vectorised per-sample top-k (rank < k_b mask) shared by top-AFA and AdaptiveK.
    """
    keep = torch.arange(ranked.shape[-1], device=acts.device) < k[:, None]
    return torch.zeros_like(acts).scatter(-1, ranked, acts.gather(-1, ranked) * keep)


def afa_k(sorted_scores: Tensor, target_norm: Tensor) -> Tensor:
    """k per row: 1 + argmin_j |sqrt(cumsum_{<=j} sorted_scores) - target_norm| (first on ties)."""
    c = sorted_scores.cumsum(dim=-1).sqrt()
    return (c - target_norm[:, None]).abs().argmin(dim=-1) + 1


@register("topafa")
class TopAFASAE(SAE):
    class Config(ArchitectureConfig):
        afa_coeff: float = Field(
            default=1 / 32,
            ge=0,
            description="weight of the norm-matching term mean_b(|f| - |target|)^2 "
            "(paper sweep 1/128-1/16)",
        )
        afa_target: Literal["centred", "input"] = Field(
            default="centred",
            description="the norm L_AFA matches |f| to: centred |x - b_dec| (the norm the "
            "selection matches) or input |x| (the paper's |z|)",
        )
        k_max: int | None = Field(
            default=None,
            gt=0,
            description="cap on the per-token k (top-k_max instead of a full sort); "
            "None: n_latents - 1, the reference's bound (no cap)",
        )
        aux_k: int | None = Field(
            default=None, gt=0, description="dead latents used by AuxK; None: d_in // 2"
        )
        aux_penalty: float = Field(default=1 / 32, ge=0, description="weight of the AuxK loss")

        def check_dimensions(self, d_model: int, n_latents: int) -> None:
            if self.k_max is not None and self.k_max >= n_latents:
                raise ValueError(
                    f"k_max = {self.k_max} must be smaller than n_latents = {n_latents}"
                )

    title = "top-AFA"
    sparse_codes = True
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    default_b_dec_init = "geometric_median"
    base_lr = 3e-4
    default_adam_betas = (0.9, 0.99)

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        del self.b_enc  # the method has no encoder bias

    @property
    def k_cap(self) -> int:
        return min(self.cfg.k_max or self.d_sae, self.d_sae - 1)

    def pre_acts(self, x: Tensor) -> Tensor:
        return sparse.linear(x - self.b_dec, self.W_enc)

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, codes): the ReLU activations and the norm-matched top-k code."""
        a = self.pre_acts(x).relu()
        scaled, ranked = (a * self.W_dec.norm(dim=1)).topk(self.k_cap, dim=-1)
        k = afa_k(scaled.detach().pow(2), (x - self.b_dec).detach().norm(dim=-1))
        return a, keep_top_ranks(a, ranked, k)

    def encode(self, x: Tensor) -> Tensor:
        return self._select(x)[1]

    def afa_loss(self, x: Tensor, codes: Tensor) -> Tensor:
        """L_AFA = mean_b (|f| - |target|)^2, target x - b_dec or x (`afa_target`)."""
        target = x - self.b_dec if self.cfg.afa_target == "centred" else x
        return (codes.norm(dim=-1) - target.norm(dim=-1)).pow(2).mean()

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        a, codes = self._select(x)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat) / self.d_in
        aux = auxk_loss(x, x_hat, a, self.W_dec, self.dead_mask(), self.cfg.aux_k or self.d_in // 2)
        afa = self.afa_loss(x, codes)
        total = mse + self.cfg.aux_penalty * aux + self.cfg.afa_coeff * afa
        return LossOutput(total, {"mse": mse, "auxk": aux, "afa": afa}, codes, x_hat)
