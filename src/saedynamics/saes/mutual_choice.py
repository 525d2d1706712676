"""Mutual Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
Choice Sparse Autoencoders", arXiv 2411.02124).

Method. The pre-activations Z = (x - b_dec) W_enc + b_enc of a batch are token-feature affinities,
and the sparsity budget M = k * B is allocated with no per-token or per-feature constraint: the M
largest entries of ReLU(Z) over the whole batch are kept, f = ReLU(Z) * S. That is exactly
BatchTopK's allocation (Bussmann et al. 2024, concurrent work): this class subclasses
`BatchTopKSAE` and runs its `batch_topk_codes`, so encode (the learned global threshold at
inference, exported as SAELens `jumprelu`), init (tied, unit decoder rows, geometric-median b_dec),
constraint (unit norm + gradient projection), defaults and pitfalls are BatchTopK's (spec section 9
-> section 3; see batchtopk.py).

The one difference is the auxiliary loss. Loss = mean_b |x - x_hat|^2 + aux_alpha * aux_zipf, in the
reconstruction's unit as BatchTopK's (`aux_form`): AuxK (spec 0.3) over the dead *and
under-utilised* latents, a latent being under-utilised when its EMA firing density p_i is below
gamma times the density a Zipf law expects at its density rank (`zipf.ZipfSAE`, zipf.py). With
`aux = "auxk"` the model is BatchTopK exactly.

Choices (the paper's code is not released, and only its abstract could be read here: it fixes the
allocation and names aux_zipf_loss, "which generalises the aux_k_loss to mitigate dead and
underutilised features"; spec section 8 marks aux_zipf and the Zipf law as *proposed*, so they are
config options; docs/architectures.md):
- Zipf law p*_r = k (r + b)^-s / sum (r' + b)^-s over density ranks r, total density k per token
  (the budget); s fitted online (least squares in log-log over the resolved densities, s >= 0)
  unless `zipf_exponent` is set; b = `zipf_offset` = 0 (plain Zipf). Fitting rather than fixing s
  makes the law the data's own: on data whose features are equally frequent it flattens (s ~ 0)
  and U is then just the latents far below the average density.
- gamma = `underused_fraction` = 0.5 (a latent at half its expected density; gamma = 1 would mark
  about half the latents at any time through noise alone); densities are EMAs with rate 0.01
  (`zipf_rate`), starting uniform at k / F; coefficient aux_alpha = 1/32 as AuxK (spec 8).
"""

from __future__ import annotations

from saedynamics.saes.base import register
from saedynamics.saes.zipf import ZipfSAE


@register("mutual_choice")
class MutualChoiceSAE(ZipfSAE):
    """BatchTopK's allocation (inherited `train_codes`) with the aux_zipf loss (`ZipfSAE`)."""

    class Config(ZipfSAE.Config):
        pass

    title = "Mutual Choice"
