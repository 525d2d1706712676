"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).
SAELens `topk`.

Method (section 2.3). The encoder keeps each token's k largest latents and zeroes the rest:
    z = TopK(W_enc (x - b_pre)),   x_hat = W_dec z + b_pre                       (section 2.3)
b_pre is our b_dec (subtracted from the input, added to the output). The equation has no latent
bias; the released code (openai/sparse_autoencoder) adds one, `latent_bias`, initialised at 0, and
applies ReLU to the k values it keeps (TopK first, then ReLU), which differs from TopK alone only
where fewer than k pre-activations are positive. Here: ReLU after TopK, as the code; the latent
bias b_enc is kept at 0 unless `encoder_bias` (the code's choice).

Loss. The reconstruction error, normalised in the paper by the error of predicting the mean
(section 2.1), plus the auxiliary loss AuxK (appendix A.2): the top-k_aux *dead* latents (no
firing in 10M tokens) model the residual e = x - x_hat,
    e_hat = W_dec z_aux,   L_aux = |e - e_hat|^2,   L = L_rec + alpha L_aux,   alpha = 1/32,
both terms normalised MSEs in the released code (L_aux by the variance of e). Our reconstruction
term is mean_b |x - x_hat|^2, not normalised: to keep the paper's balance between the two, AuxK is
weighted by the token variance V = mean_b |x - mean_b x|^2 of the batch,
    total = mean_b |x - x_hat|^2 + alpha V L_aux,
which is the paper's L_rec/V + alpha L_aux times V (`aux_scale = "data_variance"`; "none" adds
alpha L_aux to the unnormalised error, which weakens AuxK by a factor V, about d_in).
Multi-TopK (section 5.3, optional, `multi_topk`): L(k) + L(4k)/8, the second term the normalised
error of the reconstruction from the top 4k latents (weighted by V as above).

Init (appendix A.1). b_pre at the geometric median of a data sample; encoder directions parallel
to the decoder's (W_enc = W_dec^T, not tied afterwards); decoder rows random, unit norm; for TopK
models the encoder's magnitude is set so that reconstructed vectors have the magnitude of the
inputs (`encoder_init_rescale`; the paper finds it makes no or a weakly negative difference, and
the code does it with random unit inputs; here on the init sample, as the paper words it).
Constraint: decoder rows renormalised to unit norm after every step, with the gradient component
parallel to them removed (shared in `base`). Inference: the same per-token TopK; no conversion.

Defaults: k = 32; k_aux = d_in / 2 (the paper uses 512 at d_model 768, the released code 256;
dictionary_learning and SAELens take d_in / 2); alpha = 1/32; dead after 10M tokens (the base
default); Adam (0.9, 0.999) (the trainer's); lr 2e-4 / sqrt(d_sae / 2^14) when unset
(dictionary_learning's fit to the paper's lr-versus-size scaling).
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


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations per row, ReLU them, zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class TopKConfig(ArchitectureConfig):
    """k and AuxK: the hyperparameters of every top-k architecture."""

    k: int = Field(default=32, gt=0, description="active latents per token")
    aux_k: int | None = Field(
        default=None, gt=0, description="dead latents used by AuxK; None: d_in // 2"
    )
    aux_alpha: float = Field(default=1 / 32, ge=0, description="weight of the AuxK loss")

    def check_dimensions(self, d_model: int, n_latents: int) -> None:
        if self.k >= n_latents:
            raise ValueError(f"k = {self.k} must be smaller than n_latents = {n_latents}")


class GaoTopKConfig(TopKConfig):
    """The choices Gao et al. 2024 make for their TopK SAE, and the alternatives."""

    encoder_bias: bool = Field(
        default=False,
        description="train a latent bias b_enc (the released code) or keep it at 0 (the "
        "equation of section 2.3)",
    )
    encoder_init_rescale: bool = Field(
        default=True,
        description="at init, scale W_enc so that reconstructions have the inputs' norm (A.1)",
    )
    aux_scale: Literal["data_variance", "none"] = Field(
        default="data_variance",
        description="weight AuxK by the batch's token variance, as the paper's normalised "
        "reconstruction loss implies, or add alpha * L_aux as is",
    )
    multi_topk: bool = Field(
        default=False, description="add the top-4k reconstruction loss / 8 (section 5.3)"
    )


@register("topk")
class TopKSAE(SAE):
    Config = GaoTopKConfig

    title = "TopK"
    sparse_codes = True
    saelens_architecture = "topk"
    unit_norm_decoder = True
    decoder_init_norm = 1.0
    default_b_dec_init = "geometric_median"

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__(d_in, d_sae, cfg, generator)
        # section 2.3: z = TopK(W_enc (x - b_pre)), no latent bias unless asked for
        self.b_enc.requires_grad_(getattr(cfg, "encoder_bias", True))

    def default_lr(self) -> float:
        return 2e-4 / (self.d_sae / 2**14) ** 0.5

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> None:
        """b_pre at the geometric median; then the encoder scaled so that mean |x_hat - b_pre|
        = mean |x - b_pre| on the sample (A.1). TopK is positively homogeneous in W_enc when
        b_enc = 0, so one rescale makes it exact."""
        super().init_from_sample(x, extras)
        if getattr(self.cfg, "encoder_init_rescale", False):
            centred = x - self.b_dec
            reconstructed = self.decode(self.encode(x)) - self.b_dec
            ratio = centred.norm(dim=-1).mean() / reconstructed.norm(dim=-1).mean()
            if torch.isfinite(ratio) and ratio > 0:
                self.W_enc.mul_(ratio)

    def encode(self, x: Tensor) -> Tensor:
        return topk_codes(self.pre_acts(x), self.cfg.k)

    def aux_weight(self, x: Tensor) -> Tensor | float:
        """alpha, times the batch's token variance where AuxK is weighted in the paper's units."""
        if getattr(self.cfg, "aux_scale", "none") == "none":
            return self.cfg.aux_alpha
        return self.cfg.aux_alpha * (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().detach()

    def loss(self, x: Tensor, step: TrainStep, extras=None) -> LossOutput:
        pre = self.pre_acts(x)
        codes = topk_codes(pre, self.cfg.k)
        x_hat = self.decode(codes)
        mse = mean_squared_error(x, x_hat)
        aux_k = self.cfg.aux_k or self.d_in // 2
        aux = auxk_loss(x, x_hat, pre, self.W_dec, self.dead_mask(), aux_k)
        total = mse + self.aux_weight(x) * aux
        terms = {"mse": mse, "auxk": aux}
        if getattr(self.cfg, "multi_topk", False):
            k4 = min(4 * self.cfg.k, self.d_sae)
            mse_4k = mean_squared_error(x, self.decode(topk_codes(pre, k4)))
            total = total + mse_4k / 8
            terms["mse_4k"] = mse_4k
        return LossOutput(total, terms, codes, x_hat)

    def saelens_config(self) -> dict:
        return {**super().saelens_config(), "k": self.cfg.k}
