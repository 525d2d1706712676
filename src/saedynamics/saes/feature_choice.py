"""Feature Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
Choice Sparse Autoencoders", arXiv 2411.02124).

Method. The pre-activations Z = (x - b_dec) W_enc + b_enc of a batch of B tokens are token-feature
affinities; each latent i chooses its m_i tokens of largest Z_:,i, f = ReLU(Z) * S, so a latent
fires on at most m_i tokens of a batch and a token on any number of latents. The capacities follow
a Zipf law and sum to the budget M = k * B (mean k active latents per token, as BatchTopK).
x_hat = f W_dec + b_dec; loss = mean_b |x - x_hat|^2 + aux_alpha * aux_zipf (in the reconstruction's
unit, BatchTopK's `aux_form`), AuxK (spec 0.3) over the dead and under-utilised latents, i.e. those
whose EMA firing density p_i is below gamma * m_i / B (`zipf.ZipfSAE`, zipf.py).

Inference. The allocation needs the batch, so each latent gets a threshold theta_i, the average of
the m_i-th largest ReLU(Z_:,i) of each training batch (the smallest activation it kept, or 0 when it
had fewer than m_i positive ones): f_i = ReLU(pre_i) * 1[pre_i > theta_i], which fires on about
m_i / B of the tokens. theta is the buffer `threshold` [d_sae], so the exported SAE is a SAELens
`jumprelu` SAE. The average is BatchTopK's estimate per latent (the mean over the batches of the
last `threshold_window` of training, the EMA before it; `threshold_estimate = "ema"` for the EMA
throughout; before the first update theta = 0 gives dense ReLU codes).

Init and constraint are not specified by the paper; as BatchTopK (spec 8, proposed): tied init,
unit decoder rows with the gradient projected, geometric-median b_dec, b_enc = 0; aux_k = d_in // 2,
aux_alpha = 1/32, lr 2e-4 / sqrt(d_sae / 2^14).

Choices (no code released; spec section 8 marks the Zipf fit, aux_zipf and the inference
conversion as open or proposed):
- Capacities. The paper fits Zipf capacities to observed densities. Under Feature Choice a latent's
  own density is its capacity, so fitting to it would be circular; the densities fitted here are
  the *demand*: the EMA (rate 0.01) of how often each latent would fire under the unconstrained
  allocation of the same budget (Mutual Choice / BatchTopK, computed on each batch). Latents are
  ranked by demand, the Zipf law p*_r = k (r + b)^-s / sum (r' + b)^-s is fitted to the ranked
  demand (least squares in log-log over the resolved densities, s >= 0; b = `zipf_offset` = 0),
  and latent i gets m_i = B p*_{rank(i)}, rounded through the cumulative sum so that sum m_i =
  k * B exactly, capped at B (a cap that makes the total < k * B is allowed: |S| <= M). Before any
  data the demand is uniform, so training starts with uniform m = k B / F (the third-party form).
  A fixed `zipf_exponent` skips the fit (0: uniform capacities throughout). A latent whose B p*
  rounds to 0 gets no token in that batch; aux_zipf and its demand can still raise it.
- aux_zipf: gamma = `underused_fraction` = 0.5 of the expected density m_i / B; aux = "auxk" gives
  plain AuxK (dead latents only; by construction there are few).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saedynamics.saes.base import LossOutput, TrainStep, register
from saedynamics.saes.batchtopk import batch_topk_codes
from saedynamics.saes.zipf import ZipfSAE


def feature_choice_codes(pre: Tensor, capacity: Tensor) -> Tensor:
    """ReLU(pre) kept where token b is among latent i's capacity[i] largest (pre [B, F])."""
    acts = pre.relu()
    m_max = int(capacity.max())
    if m_max == 0:
        return torch.zeros_like(acts)
    values, indices = acts.topk(m_max, dim=0)  # [m_max, F], each column descending
    keep = torch.arange(m_max, device=pre.device)[:, None] < capacity
    return torch.zeros_like(acts).scatter(0, indices, values * keep)


def capacities(target_density: Tensor, n_tokens: int) -> Tensor:
    """m_i = n_tokens * p*_i rounded through the cumulative sum (sum preserved), capped at n_tokens."""
    cumulative = (target_density.double() * n_tokens).cumsum(0).round().long()
    m = torch.diff(cumulative, prepend=cumulative.new_zeros(1))
    return m.clamp(0, n_tokens)


@register("feature_choice")
class FeatureChoiceSAE(ZipfSAE):
    class Config(ZipfSAE.Config):
        pass

    title = "Feature Choice"

    def train_codes(self, pre: Tensor) -> Tensor:
        return feature_choice_codes(pre, capacities(self.target_density, pre.shape[0]))

    def batch_demand(self, out: LossOutput, x: Tensor) -> Tensor:
        """The density each latent would have under the unconstrained allocation of k * B."""
        return (batch_topk_codes(self.pre_acts(x), self.cfg.k) != 0).float().mean(dim=0)

    @torch.no_grad()
    def update_threshold(self, codes: Tensor, step: TrainStep) -> None:
        """theta_i <- EMA of the m_i-th largest activation of latent i (capacities of this batch)."""
        m = capacities(self.target_density, codes.shape[0])
        m_max = int(m.max())
        if m_max == 0:
            return
        ranked = codes.topk(m_max, dim=0).values  # latent i's kept values, then zeros
        value = ranked.gather(0, (m - 1).clamp_min(0)[None])[0]
        self.estimate_threshold_(value, step, where=m > 0)
