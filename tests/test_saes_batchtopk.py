"""The BatchTopK family: BatchTopK, Mutual Choice, Feature Choice, Matryoshka.

Per architecture: the defining property on real tensors, the loss against brute force, export with
an input scale, save/load, SAELens agreement (1e-5 absolute on float32 codes and reconstructions),
and recovery of a known dictionary by the real trainer (slow).
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
from saedynamics.saes.batchtopk import batch_topk_codes, zipf_targets
from saedynamics.saes.feature_choice import capacities, feature_choice_codes
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
        out = sae.loss(x, TrainStep(i, n))
        opt.zero_grad()
        out.total.backward()
        sae.before_step()
        opt.step()
        sae.after_step(out, x)
    return out


def brute_auxk(x, x_hat, pre, W_dec, dead, k_aux):
    """AuxK (spec 0.3) with explicit loops over tokens, in float64."""
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
    assert math.isclose(out.total.item(), mse.item() + 0.25 * aux, rel_tol=1e-4)


def test_threshold_ema_by_hand():
    sae = make("batchtopk", threshold_rate=0.1)
    x = torch.randn(4, 8)
    assert torch.equal(sae.threshold, torch.zeros(32))  # before any update: dense ReLU codes
    assert torch.equal(sae.encode(x), sae.pre_acts(x).relu())
    out = sae.loss(x, TrainStep(0, 2))
    out.codes = torch.zeros(4, 32)
    out.codes[0, 1], out.codes[2, 5], out.codes[3, 0] = 2.0, 0.5, 1.0
    sae.after_step(out, x)
    assert torch.allclose(sae.threshold, torch.full((32,), 0.5))  # first update: the batch min
    out.codes[2, 5] = 3.0
    sae.after_step(out, x)
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
    assert math.isclose(out.total.item(), mse.item() + aux / 32, rel_tol=1e-4)


def test_zipf_densities_track_firing():
    sae = make("mutual_choice", zipf_rate=0.5)
    x = torch.randn(64, 8)
    out = sae.loss(x, TrainStep(0, 1))
    fired = (out.codes != 0).float().mean(dim=0)
    sae.after_step(out, x)
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
    out = sae.loss(x, TrainStep(0, 1))
    acts = sae.pre_acts(x).relu().detach()
    second_largest = acts.sort(dim=0, descending=True).values[1]
    sae.after_step(out, x)
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
        make("matryoshka", k=2, dead_tokens=10, aux_alpha=0.5, group_weights=[1, 2, 0, 1, 4])
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
    aux = brute_auxk(x, full, sae.pre_acts(x), sae.W_dec, sae.dead_mask(), 4)
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
# Measured (seeds 0, 1; 3M tokens): BatchTopK 0.94, 0.91; Mutual Choice 0.98, 0.95 (aux_zipf revives
# the rarely selected latents); Feature Choice 0.98, 0.98. The thresholds sit ~0.05 under those and
# far above a random dictionary (~0.44). Matryoshka: its inner prefixes (2, 4, 8 latents of 32) must
# reconstruct alone, which on features without hierarchy they can only do by mixing features
# ("feature hedging", Chanin et al. 2025; the SAELens docs warn of it) while the outer latents
# compensate; the near-1 recovery Bussmann et al. 2025 show is on hierarchical toy data and does not
# apply. Measured 0.70, 0.72 (the same with 2 groups of 16; with one group it is BatchTopK exactly);
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
