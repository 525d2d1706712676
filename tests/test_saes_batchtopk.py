"""The BatchTopK family: BatchTopK, Mutual Choice, Feature Choice, Matryoshka.

Per architecture: the defining equations on a hand-computed example (`test_<arch>_equations_by_hand`),
the defining property on real tensors, the loss against brute force, export with an input scale,
save/load, SAELens agreement (1e-5 absolute on float32 codes and reconstructions), and recovery of a
known dictionary by the real trainer, with the inference threshold giving the training L0 (slow).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from saedynamics.saes import REGISTRY, TrainStep, load
from saedynamics.saes.batchtopk import batch_topk_codes
from saedynamics.saes.feature_choice import capacities, feature_choice_codes
from saedynamics.saes.zipf import zipf_targets
from tests.synthetic import make_sae, organism_tensors, recovery

FAMILY = ["batchtopk", "mutual_choice", "feature_choice", "matryoshka"]
SAELENS_ATOL = 1e-5  # float32; SAELens orders its floating-point operations differently


def make(name: str, d_in=8, d_sae=32, seed=0, **hyper):
    return make_sae(name, d_in, d_sae, seed, **{"k": 3, **hyper})


def randomise(sae, seed=0):
    """Non-trivial parameters: perturbed weights, biases and positive per-latent thresholds."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        sae.threshold.copy_(torch.rand(sae.d_sae, generator=g) * 0.8)
    return sae


def train_steps(sae, x, n=3, lr=1e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for i in range(n):
        step = TrainStep(i, n)
        out = sae.loss(x, step)
        opt.zero_grad()
        out.total.backward()
        sae.before_step()
        opt.step()
        sae.after_step(out, x, step)
    return out


def set_weights(sae, W_enc, b_enc, W_dec, b_dec):
    """Hand-chosen parameters (nested lists)."""
    with torch.no_grad():
        for name, value in zip(
            ("W_enc", "b_enc", "W_dec", "b_dec"), (W_enc, b_enc, W_dec, b_dec), strict=True
        ):
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def brute_auxk(x, x_hat, pre, W_dec, dead, k_aux, normalised=True):
    """AuxK with explicit loops over tokens, in float64: sum_b |e - e_hat|^2 / sum_b |e - mean e|^2
    (spec 0.3), or with normalised False the paper's mean_b |e - e_hat|^2."""
    x, x_hat, pre, W_dec = (t.detach().double().numpy() for t in (x, x_hat, pre, W_dec))
    dead = dead.numpy()
    if not dead.any():
        return 0.0
    e = x - x_hat
    e_hat = np.zeros_like(e)
    for b in range(len(x)):
        candidates = sorted(np.flatnonzero(dead), key=lambda i: -pre[b, i])[:k_aux]
        for i in candidates:
            e_hat[b] += max(pre[b, i], 0.0) * W_dec[i]
    if not normalised:
        return ((e - e_hat) ** 2).sum() / len(x)
    return ((e - e_hat) ** 2).sum() / ((e - e.mean(axis=0)) ** 2).sum()


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize(
    "bad",
    [
        {"k": 0},
        {"aux_alpha": -0.1},
        {"aux_k": 0},
        {"threshold_rate": 0.0},
        {"threshold_rate": 1.5},
        {"threshold_start_step": -1},
        {"threshold_window": 0.0},
        {"threshold_window": 1.5},
        {"threshold_estimate": "median"},
        {"aux_form": "plain"},
    ],
)
def test_bad_hyperparameters_fail_validation(name, bad):
    with pytest.raises(ValidationError):
        REGISTRY[name].Config(architecture=name, **bad)


@pytest.mark.parametrize("name", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize(
    "bad",
    [
        {"zipf_exponent": -1.0},
        {"zipf_offset": -1.0},
        {"underused_fraction": 0.0},
        {"underused_fraction": 1.5},
        {"zipf_rate": 0.0},
        {"aux": "l1"},
    ],
)
def test_bad_zipf_hyperparameters_fail_validation(name, bad):
    with pytest.raises(ValidationError):
        REGISTRY[name].Config(architecture=name, **bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"group_fractions": [0.5, 0.4]}, "sum to 1"),
        ({"group_fractions": [1.2, -0.2]}, "positive"),
        ({"group_fractions": []}, "at least 1"),
        ({"group_weights": [1.0, 1.0]}, "one per group"),
        ({"group_weights": [1, 1, 1, 1, -1]}, "non-negative"),
        ({"prefix_loss": "max"}, "prefix_loss"),
    ],
)
def test_bad_matryoshka_groups_fail_validation(bad, match):
    with pytest.raises(ValidationError, match=match):
        REGISTRY["matryoshka"].Config(architecture="matryoshka", **bad)


@pytest.mark.parametrize("name", FAMILY)
def test_k_must_be_below_n_latents(name):
    cfg = REGISTRY[name].Config(architecture=name, k=32)
    with pytest.raises(ValueError, match="k = 32 must be smaller than n_latents = 32"):
        cfg.check_dimensions(8, 32)
    cfg.check_dimensions(8, 33)


def test_matryoshka_groups_must_fit_the_dictionary():
    cfg = REGISTRY["matryoshka"].Config(architecture="matryoshka", k=2)
    cfg.check_dimensions(8, 16)  # groups 1, 1, 2, 4, 8
    with pytest.raises(ValueError, match=r"group sizes \[0, 0, 1, 3, 8\] for n_latents = 12"):
        cfg.check_dimensions(8, 12)


# ---- BatchTopK ----------------------------------------------------------------------------------


def test_batch_topk_codes_by_hand():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, 1.0, -3.0, 0.1]])
    # k = 2, B = 2: the 4 largest of ReLU(pre) over the batch are 3, 2, 1, 0.5 (3 on token 1)
    expected = torch.tensor([[3.0, 0.0, 2.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(batch_topk_codes(pre, 2), expected)
    # fewer positive entries than k * B: only the positive ones survive
    assert torch.equal(batch_topk_codes(-pre.abs(), 2), torch.zeros(2, 4))
    # leading dims are flattened (pitfall 4)
    assert torch.equal(batch_topk_codes(pre[None], 2)[0], expected)


def test_batchtopk_keeps_exactly_k_times_batch_nonzeros():
    sae = make("batchtopk", k=3)
    x = torch.randn(256, 8) * 2
    codes = sae.loss(x, TrainStep(0, 1)).codes
    assert int((codes != 0).sum()) == 3 * 256
    per_token = (codes != 0).sum(dim=1)
    assert per_token.min() < 3 < per_token.max()  # the budget is the batch's, not the token's
    # and the kept entries are the largest: every kept value >= every dropped positive value
    acts = sae.pre_acts(x).relu()
    assert codes[codes != 0].min() >= acts[codes == 0].max()


def test_batchtopk_loss_against_brute_force():
    sae = randomise(make("batchtopk", k=2, aux_k=3, aux_alpha=0.25, dead_tokens=10))
    sae.tokens_since_fired[::3] = 10  # every third latent dead
    x = torch.randn(16, 8)
    out = sae.loss(x, TrainStep(0, 1))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = pre.relu().detach().numpy()
    cutoff = np.sort(acts.ravel())[-2 * 16]  # the (k B)-th largest
    codes = torch.tensor(np.where(acts >= cutoff, acts, 0.0))
    assert torch.allclose(out.codes, codes)
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    aux = brute_auxk(x, x_hat, pre, sae.W_dec, sae.dead_mask(), 3)
    assert aux > 0 and math.isclose(out.terms["auxk"].item(), aux, rel_tol=1e-4)
    # the loss weighs the auxiliary squared error, mean_b |e - e_hat|^2 (the authors' code)
    squared = brute_auxk(x, x_hat, pre, sae.W_dec, sae.dead_mask(), 3, normalised=False)
    assert math.isclose(out.total.item(), mse.item() + 0.25 * squared, rel_tol=1e-4)
    normalised = randomise(make("batchtopk", k=2, aux_k=3, aux_alpha=0.25, dead_tokens=10))
    normalised.cfg = normalised.cfg.model_copy(update={"aux_form": "normalised"})
    normalised.tokens_since_fired[::3] = 10
    total = normalised.loss(x, TrainStep(0, 1)).total.item()
    assert math.isclose(total, mse.item() + 0.25 * aux, rel_tol=1e-4)  # dictionary_learning's


# The hand example of the BatchTopK equations: d_in 2, F 3, k 1, B 2, so k * B = 2 entries per batch.
HAND = {
    "W_enc": [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
    "b_enc": [0.0, 0.0, -1.5],
    "W_dec": [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
    "b_dec": [0.0, 0.0],
}
HAND_X = [[3.0, 1.0], [-1.0, 2.0]]  # pre = [[3, 1, 2.5], [-1, 2, -0.5]]
HAND_CODES = [[3.0, 0.0, 2.5], [0.0, 0.0, 0.0]]  # the 2 largest of the batch: both on token 1
HAND_MSE = (1.5**2 + 1.0**2 + 1.0**2 + 2.0**2) / 2  # x_hat = [[4.5, 2], [0, 0]]


def hand_sae(name, **hyper):
    sae = make_sae(name, 2, 3, 0, **{"k": 1, **hyper})
    return set_weights(sae, **HAND)


def test_batchtopk_equations_by_hand():
    """Section 3: f = BatchTopK(ReLU(pre)) keeps the k*B largest entries of the batch, x_hat = f
    W_dec + b_dec, L = mean_b |x - x_hat|^2 (no dead latent: AuxK = 0); inference theta = the mean
    over batches of the smallest kept activation, f = ReLU(pre) 1[pre > theta]."""
    sae = hand_sae("batchtopk", threshold_window=1.0)
    x = torch.tensor(HAND_X)
    step = TrainStep(0, 2)
    out = sae.loss(x, step)
    assert torch.equal(out.codes, torch.tensor(HAND_CODES))
    assert torch.allclose(out.x_hat, torch.tensor([[4.5, 2.0], [0.0, 0.0]]))
    assert math.isclose(out.total.item(), HAND_MSE, rel_tol=1e-6)  # 4.125
    sae.after_step(out, x, step)
    assert torch.allclose(sae.threshold, torch.full((3,), 2.5))  # the batch's smallest kept value
    x2 = torch.tensor([[0.0, 4.0], [3.0, 0.0]])  # pre [[0, 4, 2.5], [3, 0, 1.5]]: keeps 4 and 3
    step = TrainStep(1, 2)
    sae.after_step(sae.loss(x2, step), x2, step)
    assert torch.allclose(sae.threshold, torch.full((3,), (2.5 + 3.0) / 2))  # their mean, 2.75
    # inference: token [3, 1] has pre [3, 1, 2.5]; only 3 > 2.75 survives
    assert torch.allclose(sae.encode(torch.tensor([[3.0, 1.0]])), torch.tensor([[3.0, 0.0, 0.0]]))


def test_batchtopk_threshold_averages_the_last_window_only():
    """threshold_window 0.5 of 4 steps: steps 0-1 follow the EMA (rate 0.5), steps 2-3 are averaged
    afresh."""
    sae = make("batchtopk", threshold_window=0.5, threshold_rate=0.5)
    x = torch.randn(4, 8)
    minima = [4.0, 2.0, 1.0, 3.0]
    for i, smallest in enumerate(minima):
        step = TrainStep(i, 4)
        out = sae.loss(x, step)
        out.codes = torch.zeros(4, 32)
        out.codes[0, 0], out.codes[1, 3] = smallest, 10.0
        sae.after_step(out, x, step)
        expected = {0: 4.0, 1: 0.5 * 4.0 + 0.5 * 2.0, 2: 1.0, 3: (1.0 + 3.0) / 2}[i]
        assert torch.allclose(sae.threshold, torch.full((32,), expected)), i


def test_mutual_choice_equations_by_hand():
    """Mutual Choice: the budget M = k*B allocated freely (the BatchTopK example), plus aux_zipf =
    AuxK over U = {dead} u {i : p_i < gamma p*_i}, p* the Zipf law k r^-s / sum_r' r'^-s by density
    rank r; densities p are EMAs of the batch firing fraction."""
    sae = hand_sae("mutual_choice", aux_k=2, underused_fraction=0.5, zipf_rate=0.5)
    x = torch.tensor(HAND_X)
    # Zipf targets, k = 1, s = 1: densities [0.1, 0.4, 0.2] have ranks 3, 1, 2 -> p* = (1/r) / H_3
    target, _ = zipf_targets(torch.tensor([0.1, 0.4, 0.2]), 1.0, 1.0, 0.0, 0.0)
    assert torch.allclose(target, torch.tensor([2 / 11, 6 / 11, 3 / 11]))
    with torch.no_grad():  # latent 1 under-utilised: 0.01 < 0.5 * 0.3; latents 0 (0.2), 2 are not
        sae.target_density.copy_(torch.tensor([0.3, 0.3, 0.3]))
        sae.density.copy_(torch.tensor([0.2, 0.01, 0.5]))
    assert sae.underused_mask().tolist() == [False, True, False]
    step = TrainStep(0, 1)
    out = sae.loss(x, step)
    assert torch.equal(out.codes, torch.tensor(HAND_CODES))
    # aux_zipf by the formula: e = x - x_hat = [[-1.5, -1], [-1, 2]]; U = {1}, pre_1 = [1, 2] and
    # d_1 = [0, 1], so e_hat = [[0, 1], [0, 2]]
    e = np.array([[-1.5, -1.0], [-1.0, 2.0]])
    e_hat = np.array([[0.0, 1.0], [0.0, 2.0]])
    aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(axis=0)) ** 2).sum()  # 7.25 / 4.625
    assert math.isclose(out.terms["aux_zipf"].item(), aux, rel_tol=1e-6)
    # in the loss as the squared error mean_b |e - e_hat|^2 = 7.25 / 2 (the authors' aux form)
    assert math.isclose(out.total.item(), HAND_MSE + (7.25 / 2) / 32, rel_tol=1e-6)
    # densities: EMA rate 0.5 of the batch's firing fraction [1/2, 0, 1/2]
    sae.after_step(out, x, step)
    expected = [0.5 * 0.2 + 0.5 * 0.5, 0.5 * 0.01 + 0.5 * 0.0, 0.5 * 0.5 + 0.5 * 0.5]
    assert torch.allclose(sae.density, torch.tensor(expected))


def test_feature_choice_equations_by_hand():
    """Feature Choice: latent i keeps its m_i largest tokens of the batch, m_i = B p*_i with the
    Zipf p* (rounded through the cumulative sum, sum m_i = k*B); aux_zipf's targets are m_i / B;
    inference theta_i = the mean over batches of latent i's m_i-th largest activation."""
    # capacities: B = 4, k = 1, p* = [2/11, 6/11, 3/11] -> B p* = [0.73, 2.18, 1.09], cumulative
    # [0.73, 2.91, 4] rounds to [1, 3, 4]: m = [1, 2, 1]
    assert capacities(torch.tensor([2 / 11, 6 / 11, 3 / 11]), 4).tolist() == [1, 2, 1]
    sae = make_sae("feature_choice", 3, 3, 0, k=1, zipf_exponent=1.0, threshold_window=1.0)
    identity = torch.eye(3).tolist()
    set_weights(sae, identity, [0.0] * 3, identity, [0.0] * 3)  # pre = x, x_hat = f
    with torch.no_grad():
        sae.target_density.copy_(torch.tensor([2 / 11, 6 / 11, 3 / 11]))
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, -1.0], [2.0, 3.0, 0.2], [0.5, 1.0, 2.0]])
    step = TrainStep(0, 1)
    out = sae.loss(x, step)
    # latent 0 keeps its top 1 token (4), latent 1 its top 2 (3, 2), latent 2 its top 1 (3)
    codes = [[0.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(out.codes, torch.tensor(codes))
    mse = (1.0 + (0.25 + 1.0) + (4.0 + 0.04) + (0.25 + 1.0 + 4.0)) / 4  # 2.885
    assert math.isclose(out.terms["mse"].item(), mse, rel_tol=1e-6)
    # aux_zipf: under-utilised below gamma * m_i / B = 0.5 * [1/4, 2/4, 1/4]
    with torch.no_grad():
        sae.density.copy_(torch.tensor([0.2, 0.2, 0.2]))
    assert sae.underused_mask().tolist() == [False, True, False]  # 0.2 < 0.25 only for latent 1
    sae.after_step(out, x, step)
    assert torch.allclose(sae.threshold, torch.tensor([4.0, 2.0, 3.0]))  # m_i-th largest kept


def test_matryoshka_equations_by_hand():
    """Section 3: x_hat_g = f_{1:m_g} W_dec[1:m_g] + b_dec for the nested prefixes, and
    L = sum_g |x - x_hat_g|^2 (+ aux; no dead latent here). f is BatchTopK's."""
    sae = make_sae("matryoshka", 4, 4, 0, k=2, group_fractions=[0.25, 0.25, 0.5])
    identity = torch.eye(4).tolist()
    set_weights(sae, identity, [0.0] * 4, identity, [0.0] * 4)  # pre = x, x_hat_g = f on prefix g
    x = torch.tensor([[3.0, 1.5, 2.0, 0.5], [0.2, 2.5, 0.0, 1.0]])
    out = sae.loss(x, TrainStep(0, 1))
    assert torch.equal(out.codes, torch.tensor([[3.0, 1.5, 2.0, 0.0], [0.0, 2.5, 0.0, 0.0]]))
    prefix_1 = ((1.5**2 + 2.0**2 + 0.5**2) + (0.2**2 + 2.5**2 + 1.0**2)) / 2  # latent 0 only
    prefix_2 = ((2.0**2 + 0.5**2) + (0.2**2 + 1.0**2)) / 2  # latents 0, 1
    prefix_3 = (0.5**2 + (0.2**2 + 1.0**2)) / 2  # all four
    assert math.isclose(out.total.item(), prefix_1 + prefix_2 + prefix_3, rel_tol=1e-6)
    # the alternatives: divided by the 3 prefixes; the authors' code adds |x - b_dec|^2, divides by 4
    mean = make_sae(
        "matryoshka", 4, 4, 0, k=2, group_fractions=[0.25, 0.25, 0.5], prefix_loss="mean"
    )
    set_weights(mean, identity, [0.0] * 4, identity, [0.0] * 4)
    assert math.isclose(
        mean.loss(x, TrainStep(0, 1)).total.item(),
        (prefix_1 + prefix_2 + prefix_3) / 3,
        rel_tol=1e-6,
    )
    code = make_sae(
        "matryoshka", 4, 4, 0, k=2, group_fractions=[0.25, 0.25, 0.5], prefix_loss="with_bias_only"
    )
    set_weights(code, identity, [0.0] * 4, identity, [0.0] * 4)
    bias_only = ((9 + 2.25 + 4 + 0.25) + (0.04 + 6.25 + 1.0)) / 2
    assert math.isclose(
        code.loss(x, TrainStep(0, 1)).total.item(),
        (bias_only + prefix_1 + prefix_2 + prefix_3) / 4,
        rel_tol=1e-6,
    )


def test_threshold_ema_by_hand():
    sae = make("batchtopk", threshold_rate=0.1, threshold_estimate="ema")
    x = torch.randn(4, 8)
    assert torch.equal(sae.threshold, torch.zeros(32))  # before any update: dense ReLU codes
    assert torch.equal(sae.encode(x), sae.pre_acts(x).relu())
    step = TrainStep(0, 2)
    out = sae.loss(x, step)
    out.codes = torch.zeros(4, 32)
    out.codes[0, 1], out.codes[2, 5], out.codes[3, 0] = 2.0, 0.5, 1.0
    sae.after_step(out, x, step)
    assert torch.allclose(sae.threshold, torch.full((32,), 0.5))  # first update: the batch min
    out.codes[2, 5] = 3.0
    sae.after_step(out, x, step)
    assert torch.allclose(sae.threshold, torch.full((32,), 0.9 * 0.5 + 0.1 * 1.0))
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), pre.relu() * (pre > 0.55))


def test_threshold_start_step():
    sae = make("batchtopk", threshold_start_step=2)
    x = torch.randn(64, 8)
    train_steps(sae, x, n=2)
    assert torch.equal(sae.threshold, torch.zeros(32))
    train_steps(sae, x, n=1)
    assert (sae.threshold > 0).all() and sae.threshold_updates == 1


# ---- Mutual Choice ------------------------------------------------------------------------------


def test_mutual_choice_allocation_is_batchtopk():
    mc, btk = make("mutual_choice", seed=4), make("batchtopk", seed=4)
    x = torch.randn(128, 8) * 2
    assert torch.equal(mc.W_enc, btk.W_enc)
    assert torch.equal(mc.train_codes(mc.pre_acts(x)), batch_topk_codes(btk.pre_acts(x), 3))
    assert torch.equal(mc.loss(x, TrainStep(0, 1)).codes, btk.loss(x, TrainStep(0, 1)).codes)
    # with AuxK as its auxiliary loss, Mutual Choice is BatchTopK, step for step
    mc = make("mutual_choice", seed=4, aux="auxk", dead_tokens=100)
    btk = make("batchtopk", seed=4, dead_tokens=100)
    for sae in (mc, btk):
        train_steps(sae, x, n=4)
    assert torch.equal(mc.W_dec, btk.W_dec) and torch.equal(mc.threshold, btk.threshold)


def test_zipf_targets_by_hand():
    density = torch.tensor([0.1, 0.4, 0.2])  # ranks 3, 1, 2
    target, s = zipf_targets(density, k=1.0, exponent=1.0, offset=0.0, floor=0.0)
    assert s == 1.0
    # p*_r = (1/r) / (1 + 1/2 + 1/3) = 6/11, 3/11, 2/11 by rank
    assert torch.allclose(target, torch.tensor([2 / 11, 6 / 11, 3 / 11]))
    target, _ = zipf_targets(density, k=3.0, exponent=2.0, offset=1.0, floor=0.0)
    law = torch.tensor([1 / 4, 1 / 9, 1 / 16])  # (r + 1)^-2
    assert torch.allclose(target, 3 * law[[2, 0, 1]] / law.sum())
    # fitted: densities exactly c (r + 2)^-1.5 in a shuffled order, and one below the floor
    ranks = torch.arange(1.0, 9.0)
    exact = 0.3 * (ranks + 2) ** -1.5
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    density = torch.cat([exact[perm], torch.tensor([1e-9])])
    target, s = zipf_targets(density, k=2.0, exponent=None, offset=2.0, floor=1e-6)
    assert math.isclose(s, 1.5, rel_tol=1e-5)
    assert math.isclose(target.sum().item(), 2.0, rel_tol=1e-5)
    assert torch.equal(target.argsort(), density.argsort())  # rank order kept
    # uniform densities: exponent 0, uniform targets
    target, s = zipf_targets(torch.full((5,), 0.2), 1.0, None, 0.0, 0.0)
    assert abs(s) < 1e-12 and torch.allclose(target, torch.full((5,), 0.2))


def test_aux_zipf_is_auxk_over_dead_and_underused_latents():
    sae = randomise(make("mutual_choice", k=2, aux_k=4, underused_fraction=0.5, dead_tokens=10))
    with torch.no_grad():
        sae.target_density.fill_(0.1)
        sae.density.fill_(0.2)
        sae.density[[1, 7]] = 0.04  # below 0.5 * 0.1: under-utilised
        sae.density[9] = 0.06  # above: fine
    sae.tokens_since_fired[20] = 10  # dead
    expected_mask = torch.zeros(32, dtype=torch.bool)
    expected_mask[[1, 7, 20]] = True
    assert torch.equal(sae.underused_mask(), expected_mask)
    x = torch.randn(16, 8)
    out = sae.loss(x, TrainStep(0, 1))
    pre = sae.pre_acts(x)
    aux = brute_auxk(x, out.x_hat, pre, sae.W_dec, expected_mask, 4)
    assert math.isclose(out.terms["aux_zipf"].item(), aux, rel_tol=1e-4)
    mse = ((x - out.x_hat) ** 2).sum(dim=1).mean()
    squared = brute_auxk(x, out.x_hat, pre, sae.W_dec, expected_mask, 4, normalised=False)
    assert math.isclose(out.total.item(), mse.item() + squared / 32, rel_tol=1e-4)


def test_zipf_densities_track_firing():
    sae = make("mutual_choice", zipf_rate=0.5)
    x = torch.randn(64, 8)
    step = TrainStep(0, 1)
    out = sae.loss(x, step)
    fired = (out.codes != 0).float().mean(dim=0)
    sae.after_step(out, x, step)
    assert torch.allclose(sae.density, 0.5 * 3 / 32 + 0.5 * fired)
    assert torch.equal(sae.demand, sae.density)  # Mutual Choice ranks by its own density
    assert math.isclose(sae.target_density.sum().item(), 3.0, rel_tol=1e-5)


# ---- Feature Choice -----------------------------------------------------------------------------


def test_capacities_by_hand():
    assert capacities(torch.tensor([0.5, 0.25, 0.25]), 4).tolist() == [2, 1, 1]
    # cumulative rounding keeps the sum: 10 * [0.15, 0.15, 0.15, 0.15, 0.4] -> cum 1.5, 3, 4.5, 6, 10
    m = capacities(torch.tensor([0.15, 0.15, 0.15, 0.15, 0.4]), 10)
    assert m.sum() == 10 and m.tolist() == [2, 1, 2, 1, 4]
    assert capacities(torch.tensor([3.0, 0.5]), 4).tolist() == [4, 2]  # capped at B


def test_feature_choice_codes_against_brute_force():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(20, 6, generator=g)
    capacity = torch.tensor([0, 1, 3, 5, 20, 2])
    codes = feature_choice_codes(pre, capacity)
    expected = torch.zeros_like(pre)
    for i in range(6):
        for b in pre[:, i].argsort(descending=True)[: capacity[i]]:
            expected[b, i] = max(pre[b, i].item(), 0.0)
    assert torch.equal(codes, expected)


def test_feature_choice_never_exceeds_capacity():
    sae = make("feature_choice", k=3)
    with torch.no_grad():  # a steep Zipf profile over the latents
        sae.target_density.copy_(zipf_targets(torch.rand(32), 3.0, 1.0, 0.0, 0.0)[0])
    x = torch.randn(256, 8) * 2 + 1
    m = capacities(sae.target_density, 256)
    assert m.sum() == 3 * 256 and m.max() > 4 * m.min()
    codes = sae.loss(x, TrainStep(0, 1)).codes
    per_latent = (codes != 0).sum(dim=0)
    assert (per_latent <= m).all() and (per_latent == m).sum() > 16
    assert (codes != 0).sum() <= 3 * 256
    per_token = (codes != 0).sum(dim=1)
    assert per_token.min() < per_token.max()  # tokens get different numbers of latents


def test_feature_choice_thresholds_and_demand_by_hand():
    sae = make("feature_choice", k=1, zipf_rate=1.0, zipf_exponent=0.0)
    x = torch.randn(64, 8) * 2
    m = capacities(sae.target_density, 64)  # uniform: 2 each
    assert (m == 2).all()
    step = TrainStep(0, 1)
    out = sae.loss(x, step)
    acts = sae.pre_acts(x).relu().detach()
    second_largest = acts.sort(dim=0, descending=True).values[1]
    sae.after_step(out, x, step)
    assert torch.allclose(sae.threshold, second_largest)  # per latent, the m_i-th largest
    # demand: the densities the unconstrained (BatchTopK) allocation would give, after the step
    expected = (batch_topk_codes(sae.pre_acts(x), 1) != 0).float().mean(dim=0)
    assert torch.allclose(sae.demand, expected)
    assert torch.allclose(sae.density, (out.codes != 0).float().mean(dim=0))


def test_feature_choice_capacities_follow_the_fitted_zipf_law():
    sae = make("feature_choice", k=3, zipf_rate=1.0)
    x = torch.randn(512, 8) * 2
    train_steps(sae, x, n=2)
    m = capacities(sae.target_density, 512)
    assert m.sum() == 3 * 512
    # latents ranked by demand get capacities non-increasing in that rank
    assert (m[sae.demand.argsort(descending=True)].diff() <= 1).all()
    assert sae.fitted_exponent > 0


# ---- Matryoshka ---------------------------------------------------------------------------------


def test_matryoshka_groups():
    sae = make("matryoshka", d_sae=48)
    assert sae.group_ends == [3, 6, 12, 24, 48]
    sae = make("matryoshka", d_sae=50, group_fractions=[0.3, 0.3, 0.4])
    assert sae.group_ends == [15, 30, 50]  # int(0.3 * 50) twice, the rest last


def test_matryoshka_loss_against_brute_force():
    sae = randomise(
        make(
            "matryoshka",
            k=2,
            dead_tokens=10,
            aux_alpha=0.5,
            group_weights=[1, 2, 0, 1, 4],
            prefix_loss="mean",
        )
    )
    sae.tokens_since_fired[::4] = 10
    x = torch.randn(16, 8)
    out = sae.loss(x, TrainStep(0, 1))
    codes = batch_topk_codes(sae.pre_acts(x), 2)
    assert torch.equal(out.codes, codes)
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 4.0]) / 8
    prefix_loss = 0.0
    for w, end in zip(weights, [2, 4, 8, 16, 32], strict=True):
        mask = (torch.arange(32) < end).float()
        x_hat = (codes * mask) @ sae.W_dec + sae.b_dec
        prefix_loss += w * ((x - x_hat) ** 2).sum(dim=1).mean()
    full = codes @ sae.W_dec + sae.b_dec
    aux = brute_auxk(x, full, sae.pre_acts(x), sae.W_dec, sae.dead_mask(), 4, normalised=False)
    assert torch.isclose(out.terms["matryoshka"], prefix_loss, rtol=1e-5)
    assert torch.isclose(out.terms["mse"], ((x - full) ** 2).sum(dim=1).mean(), rtol=1e-5)
    assert math.isclose(out.total.item(), prefix_loss.item() + 0.5 * aux, rel_tol=1e-4)
    # one group: the prefix loss is the reconstruction error, i.e. BatchTopK
    one = make("matryoshka", group_fractions=[1.0], seed=3)
    btk = make("batchtopk", seed=3)
    assert torch.equal(one.loss(x, TrainStep(0, 1)).total, btk.loss(x, TrainStep(0, 1)).total)


# ---- every architecture of the family -----------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_tied_init_unit_decoder_and_median_b_dec(name):
    sae = make(name)
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert torch.equal(sae.b_enc, torch.zeros(32))
    x = torch.randn(200, 8) + 5
    sae.init_from_sample(x)
    assert (sae.b_dec - 5).abs().max() < 0.5  # geometric median, near the centre
    out = train_steps(sae, x, n=2, lr=0.05)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert set(out.terms) >= {"mse"}


@pytest.mark.parametrize("name", FAMILY)
def test_export_folds_scale_exactly(name):
    sae = randomise(make(name, seed=1))
    scale = 2.5
    x = torch.randn(50, 8)
    exported = sae.exported(scale)
    assert torch.equal(exported.threshold, sae.threshold)  # pre-activations are unchanged
    codes = exported.encode(x)
    assert (codes != 0).any() and (codes == 0).any()
    assert torch.allclose(codes, sae.encode(x * scale), atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)
    # the training allocation too (it is what a trained threshold summarises)
    assert torch.allclose(
        exported.train_codes(exported.pre_acts(x)), sae.train_codes(sae.pre_acts(x * scale))
    )


@pytest.mark.parametrize("name", FAMILY)
def test_save_load_round_trip(tmp_path, name):
    sae = randomise(make(name, seed=2))
    sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 2})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
    assert cfg["saedynamics"]["architecture"] == name
    tensors = load_file(tmp_path / "sae/sae_weights.safetensors")
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = load(tmp_path / "sae")
    x = torch.randn(10, 8)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert torch.equal(loaded.threshold, sae.threshold)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("name", FAMILY)
def test_saelens_loads_as_jumprelu_and_agrees(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens")
    sae = randomise(make(name, d_in=12, d_sae=48, seed=5), seed=5).exported(1.7)
    sae.save(tmp_path / name, {"hook_name": "blocks.0.hook_resid_post"}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / name))
    assert type(theirs).__name__ == "JumpReLUSAE"
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(0)) * 2 + 0.3
    with torch.no_grad():
        ours = sae.encode(x)
        assert (ours != 0).any() and (ours == 0).any()
        torch.testing.assert_close(theirs.encode(x), ours, atol=SAELENS_ATOL, rtol=0)
        torch.testing.assert_close(theirs.decode(ours), sae.decode(ours), atol=SAELENS_ATOL, rtol=0)


# ---- recovery of a known dictionary (the real trainer) ------------------------------------------

# Thresholds on each seed's MCC. Song, Muhamed et al. 2025 report an MCC near 1 for TopK SAEs at
# the true k on this organism (TopK reaches ~0.94 here in 3M tokens). BatchTopK, Mutual Choice and
# Feature Choice are top-k SAEs with the budget k*B spread over the batch, so near 1 is expected of
# them too, minus what the batch budget costs on an organism whose samples have exactly k features:
# some tokens take latents from others and a few latents end up merged or rarely selected.
# Measured (seeds 0, 1; 3M tokens; issue 18 defaults: AuxK as a squared error, the mean threshold):
# BatchTopK 0.94, 0.94; Mutual Choice 0.95, 0.95; Feature Choice 0.98, 0.98; inference L0 2.98-3.05
# for all four (k = 3). The thresholds sit 0.05-0.08 under those and far above a random dictionary
# (~0.44). Matryoshka: its inner prefixes (2, 4, 8 latents of 32) must
# reconstruct alone, which on features without hierarchy they can only do by mixing features
# ("feature hedging", Chanin et al. 2025; the SAELens docs warn of it) while the outer latents
# compensate; the near-1 recovery Bussmann et al. 2025 show is on hierarchical toy data and does not
# apply. Measured 0.71, 0.72 (the same with 2 groups of 16; with one group it is BatchTopK exactly);
# the test asks for clearly above the null.
RECOVERY = {
    "batchtopk": 0.86,
    "mutual_choice": 0.9,
    "feature_choice": 0.93,
    "matryoshka": 0.65,
}
# Dead windows as Bussmann's code counts them, in batches of the test's 1024 tokens: 5 (BatchTopK
# repo) and 20 (matryoshka_sae repo). lr 8e-3: the default rule 2e-4 / sqrt(F / 2^14) gives 4.5e-3
# at F = 32, from which the 3M-token runs end less converged (BatchTopK 0.91, 0.86).
HYPER = {"k": 3, "lr": 8e-3}
DEAD_BATCHES = {"matryoshka": 20}


def held_out(n=4096):
    """Fresh samples of the organism (same dictionary, new codes), raw (unscaled)."""
    _, a_true = organism_tensors(n=10)  # the dictionary only
    rng = np.random.default_rng(123)
    codes = np.zeros((n, 32))
    active = np.argsort(rng.random((n, 32)), axis=1)[:, :3]
    np.put_along_axis(codes, active, np.abs(rng.standard_normal((n, 3))), axis=1)
    return torch.tensor(codes @ a_true, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_recovers_the_true_dictionary(tmp_path, name):
    hyper = {**HYPER, "dead_tokens": DEAD_BATCHES.get(name, 5) * 1024}
    scores = recovery(tmp_path, name, hyper, train_tokens=3_000_000)
    assert min(scores) > RECOVERY[name], scores
    x = held_out()
    for seed in (0, 1):
        sae = load(tmp_path / name / f"seed{seed}")
        with torch.no_grad():
            codes = sae.encode(x)
        # the inference thresholds give the training sparsity on new data
        l0 = (codes != 0).sum(dim=1).float().mean().item()
        assert abs(l0 - 3) < 0.2, l0
        if name == "matryoshka":  # every prefix reconstructs, better the more latents it has
            with torch.no_grad():
                errors = [
                    ((x - x_hat) ** 2).sum(dim=1).mean().item()
                    for x_hat in sae.prefix_reconstructions(codes)
                ]
                bias_only = ((x - sae.b_dec) ** 2).sum(dim=1).mean().item()
            assert errors[0] < bias_only and all(np.diff(errors) < 0), (bias_only, errors)
