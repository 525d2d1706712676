"""Variable or sampled top-k: vsae (variational TopK), topafa (norm-matched k), adaptivek (probe k).

Each architecture's defining property on real tensors, its loss against a hand-computed value,
export with the input scale folded, save/load, and recovery of a known dictionary.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch.distributions import Normal, kl_divergence

from saedynamics.saes import REGISTRY, TrainStep, load
from saedynamics.saes.adaptivek import RIDGE_LAMBDAS, ridge_cv, ridge_fit
from tests.synthetic import make_sae as make
from tests.synthetic import recovery


@pytest.fixture(autouse=True)
def _global_seed():
    """Random test tensors independent of test order."""
    torch.manual_seed(0)


def randomise(sae, decoder_norms=True):
    """Non-trivial biases (and decoder norms), as after training."""
    with torch.no_grad():
        if decoder_norms:
            sae.W_dec.mul_(torch.linspace(0.2, 3.0, sae.d_sae)[:, None])
        if hasattr(sae, "b_enc"):
            sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()


def aux_by_hand(x, x_hat, values, W_dec, dead, k_aux):
    """Canonical AuxK (spec 0.3) by a loop: dead latents ranked by |value|, decoded signed."""
    e = (x - x_hat).detach()
    e_hat = torch.zeros_like(e)
    for b in range(len(x)):
        order = sorted(torch.nonzero(dead).flatten().tolist(), key=lambda i: -abs(values[b, i]))
        for i in order[:k_aux]:
            e_hat[b] += values[b, i] * W_dec[i]
    return ((e - e_hat) ** 2).sum() / ((e - e.mean(dim=0)) ** 2).sum()


def set_parameters(sae, **values):
    """Overwrite parameters with the hand-chosen numbers of an equation test."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))


def test_registered():
    assert {"vsae", "topafa", "adaptivek"} <= set(REGISTRY)
    assert REGISTRY["adaptivek"].requires == ("lm_entropy",)


@pytest.mark.parametrize(
    "name, hyper, message",
    [
        ("vsae", {"k": 32}, "k = 32 must be smaller than n_latents = 32"),
        ("topafa", {"k_max": 40}, "k_max = 40 must be smaller than n_latents = 32"),
        ("adaptivek", {}, "k_max = 320 must be smaller than n_latents = 32"),
    ],
)
def test_dimension_checks_name_the_value(name, hyper, message):
    cfg = REGISTRY[name].Config(architecture=name, **hyper)
    with pytest.raises(ValueError, match=message):
        cfg.check_dimensions(8, 32)
    cfg.check_dimensions(8, 4096)


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("vsae", {"kl_coeff": -1.0}),
        ("vsae", {"aux_alpha": -0.1}),
        ("vsae", {"fixed_std": -1.0}),
        ("vsae", {"var_flag": "both"}),
        ("topafa", {"afa_coeff": -0.1}),
        ("topafa", {"aux_penalty": -1.0}),
        ("adaptivek", {"l1_weight": -0.1}),
        ("adaptivek", {"probe_weight": -0.1}),
        ("adaptivek", {"k_min": 30, "k_max": 20}),
        ("adaptivek", {"phase_ratio": 1.5}),
    ],
)
def test_invalid_hyperparameters_fail_validation(name, hyper):
    with pytest.raises(ValidationError):
        REGISTRY[name].Config(architecture=name, **hyper)


# ---- vsae ----------------------------------------------------------------------------------------


def test_vsae_kl_is_the_closed_form_gaussian_kl():
    sae = make("vsae", k=4)
    with torch.no_grad():
        sae.W_var.normal_(0, 0.2)
        sae.b_enc.normal_(0, 0.5)
    x = torch.randn(16, 8)
    mu, log_var = sae.mean(x), sae.log_var(x)
    assert log_var.std() > 0.1 and (log_var > -6).all() and (log_var < 2).all()
    posterior = Normal(mu, (0.5 * log_var).exp())
    expected = kl_divergence(posterior, Normal(0.0, 1.0)).sum(dim=-1).mean()
    assert torch.isclose(sae.kl(mu, log_var), expected, rtol=1e-5)
    assert torch.isclose(sae.loss(x, TrainStep(0, 10)).terms["kl"], expected, rtol=1e-5)
    # fixed variance at the write-up's sigma = 1: the full KL again
    fixed = make("vsae", k=4, var_flag="fixed", fixed_std=1.0)
    mu = fixed.mean(x)
    expected = kl_divergence(Normal(mu, 1.0), Normal(0.0, 1.0)).sum(dim=-1).mean()
    assert torch.isclose(fixed.loss(x, TrainStep(0, 10)).terms["kl"], expected, rtol=1e-5)
    assert not hasattr(fixed, "W_var")


def test_vsae_equations_by_hand():
    """One token, 3 latents, k = 2: mu, log sigma^2 (one clamped at 2), z = mu + sigma eps, the
    top-2 by |z| with its sign, and KL = 1/2 sum_i (mu_i^2 + sigma_i^2 - 1 - log sigma_i^2)."""
    sae = make("vsae", d_in=2, d_sae=3, k=2, kl_coeff=2.0, kl_warmup_fraction=0.1)
    set_parameters(
        sae,
        W_enc=[[1.0, 0.5, -1.0], [0.5, -1.0, 0.25]],
        b_enc=[0.5, 0.0, 0.2],
        W_var=[[0.5, 0.0, 5.0], [0.0, -1.0, 0.0]],
        b_var=[-2.0, -2.0, -2.0],
        W_dec=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
        b_dec=[0.1, -0.2],
    )
    x = torch.tensor([[1.0, -2.0]])
    eps = [1.0, -4.0, 0.5]
    sae.noise = lambda like: torch.tensor([eps])
    # by hand: pre = x W_enc + b_enc = (0.5, 2.5, -1.3); raw log-variances (-1.5, 0, 3) -> clamp 2
    mu = [0.5, 2.5, 0.0]
    log_var = [-1.5, 0.0, 2.0]
    z = [m + math.exp(lv / 2) * e for m, lv, e in zip(mu, log_var, eps, strict=True)]
    assert [round(v, 6) for v in z] == [0.972367, -1.5, 1.359141]
    f = [0.0, z[1], z[2]]  # the two largest |z|: latents 1 (negative, kept) and 2
    kl = sum(0.5 * (m**2 + math.exp(lv) - 1 - lv) for m, lv in zip(mu, log_var, strict=True))
    assert math.isclose(kl, 5.806093, abs_tol=1e-6)
    x_hat = [f[0] + f[2] + 0.1, f[1] + f[2] - 0.2]
    mse = (1.0 - x_hat[0]) ** 2 + (-2.0 - x_hat[1]) ** 2
    out = sae.loss(x, TrainStep(5, 100))  # progress 0.05: half the 10% KL warm-up
    assert torch.allclose(sae.mean(x), torch.tensor([mu]))
    assert torch.allclose(sae.log_var(x), torch.tensor([log_var]))
    assert torch.allclose(out.codes, torch.tensor([f]), atol=1e-6)
    assert math.isclose(out.terms["kl"].item(), kl, rel_tol=1e-6)
    assert math.isclose(out.terms["mse"].item(), mse, rel_tol=1e-6)
    assert math.isclose(out.total.item(), mse + 2.0 * 0.5 * kl, rel_tol=1e-6)
    # inference: no noise, z = mu, top-2 of mu
    assert torch.allclose(sae.encode(x), torch.tensor([[0.5, 2.5, 0.0]]))
    # fixed variance: the mu-dependent part of the KL, 1/2 sum mu^2 = 1/2 (0.25 + 6.25)
    fixed = make("vsae", d_in=2, d_sae=3, k=2, var_flag="fixed", fixed_std=0.0)
    fixed.load_state_dict(sae.state_dict(), strict=False)
    assert math.isclose(fixed.loss(x, TrainStep(5, 100)).terms["kl"].item(), 3.25, rel_tol=1e-6)


def test_vsae_init_defaults_and_no_decoder_constraint():
    sae = make("vsae", d_in=8, d_sae=32)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(sae.b_var, torch.full((32,), -2.0))  # sigma^2 = e^-2 at init
    cfg = sae.cfg
    assert (cfg.k, cfg.var_flag, cfg.kl_coeff, cfg.kl_warmup_fraction) == (32, "learned", 1.0, 0.1)
    assert sae.lr == 5e-4 and cfg.aux_alpha == 1 / 32 and not sae.apply_b_dec_to_input
    # April mode: the decoder is unconstrained, its norms move freely
    x = torch.randn(16, 8)
    step = TrainStep(0, 10)
    out = sae.loss(x, step)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step(out, x, step)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((32,), 0.3))


def test_vsae_samples_in_training_and_not_at_inference():
    sae = make("vsae", k=4)
    with torch.no_grad():
        sae.W_var.zero_()
        sae.b_var.fill_(0.0)  # sigma = 1
    x = torch.randn(32, 8)
    mu = sae.mean(x)
    # inference: deterministic, a top-k on mu >= 0
    codes = sae.encode(x)
    assert torch.equal(codes, sae.encode(x)) and (codes >= 0).all()
    assert torch.equal(
        codes, torch.zeros_like(mu).scatter(-1, mu.topk(4).indices, mu.topk(4).values)
    )
    # training: z = mu + eps * sigma, top-k by |z|, signs kept
    eps = torch.randn(32, 32)
    sae.noise = lambda like: eps
    out = sae.loss(x, TrainStep(0, 10))
    z = mu + eps
    idx = z.abs().topk(4).indices
    assert torch.equal(out.codes, torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx)))
    assert (out.codes < 0).any() and not torch.equal(out.codes, codes)
    # the noise: fresh every step, reproducible per seed, different between seeds
    a, b, c = make("vsae", k=4), make("vsae", k=4), make("vsae", k=4, seed=1)
    first = a.loss(x, TrainStep(0, 10)).codes
    assert torch.equal(first, b.loss(x, TrainStep(0, 10)).codes)
    assert not torch.equal(first, a.loss(x, TrainStep(0, 10)).codes)
    c.load_state_dict(a.state_dict())
    assert not torch.equal(first, c.loss(x, TrainStep(0, 10)).codes)
    # the reference code's deterministic "fixed variance"
    deterministic = make("vsae", k=4, var_flag="fixed", fixed_std=0.0)
    assert torch.equal(deterministic.loss(x, TrainStep(0, 10)).codes, deterministic.encode(x))


def test_vsae_loss_by_hand():
    sae = make("vsae", d_in=4, d_sae=6, k=2, aux_k=2, kl_coeff=3.0, kl_warmup_fraction=0.2)
    randomise(sae)
    with torch.no_grad():
        sae.W_var.normal_(0, 0.3)
    sae.tokens_since_fired[:] = torch.tensor([0, 10**8, 0, 10**8, 10**8, 0])  # 1, 3, 4 dead
    x = torch.randn(5, 4)
    eps = torch.randn(5, 6)
    sae.noise = lambda like: eps
    out = sae.loss(x, TrainStep(10, 100))  # progress 0.1: half the KL warm-up
    mu = torch.relu(x @ sae.W_enc + sae.b_enc)  # April mode: no b_dec subtracted
    log_var = (x @ sae.W_var + sae.b_var).clamp(-6, 2)
    z = mu + eps * torch.exp(log_var / 2)
    f = torch.zeros_like(z)
    for b in range(5):
        for i in sorted(range(6), key=lambda i: -abs(z[b, i]))[:2]:
            f[b, i] = z[b, i]
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(dim=1).mean()
    aux = aux_by_hand(x, x_hat, z, sae.W_dec, sae.dead_mask(), 2)
    assert aux > 0
    assert torch.isclose(out.terms["auxk"], aux, rtol=1e-5)
    assert torch.isclose(out.total, mse + 3.0 * 0.5 * kl + aux / 32, rtol=1e-5)


def test_vsae_export_folds_the_scale_and_keeps_decoder_norms():
    sae = make("vsae", k=5, seed=1)
    randomise(sae)
    scale = 2.5
    x = torch.randn(50, 8)
    exported = sae.exported(scale)
    assert torch.allclose(exported.encode(x), sae.encode(x * scale), atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)
    assert torch.allclose(exported.W_dec * scale, sae.W_dec)  # norms not folded: same top-k set
    assert torch.allclose(exported.log_var(x), sae.log_var(x * scale), atol=1e-5)
    with pytest.raises(NotImplementedError):
        sae.fold_decoder_norm()


def test_vsae_save_load_and_sae_lens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make("vsae", k=5, seed=2)
    randomise(sae)
    with torch.no_grad():
        sae.b_enc[:26] = -5.0  # some tokens have fewer than k positive pre-activations
    exported = sae.exported(1.7)
    exported.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 2})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5
    assert cfg["saedynamics"]["loadable_by"] == ["saedynamics", "sae_lens"]
    x = torch.randn(40, 8) * 2
    loaded = load(tmp_path / "sae")
    assert set(loaded.weights()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert torch.equal(loaded(x), exported(x))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    ours = exported.encode(x)
    assert ((ours != 0).sum(dim=1) < 5).any()
    assert torch.allclose(theirs.encode(x), ours, atol=1e-5)
    assert torch.allclose(theirs.decode(ours), exported.decode(ours), atol=1e-5)


# ---- topafa --------------------------------------------------------------------------------------


def test_topafa_equations_by_hand():
    """Two tokens, 4 latents: ranking by a_i |d_i|, k = argmin_j |c_j - |x - b_dec||, and
    L_AFA = mean_b (|f| - |target|)^2 with the centred and the paper's input target."""
    sae = make("topafa", d_in=2, d_sae=4, afa_coeff=0.5)
    b_dec = [0.5, -1.0]
    set_parameters(
        sae,
        W_enc=[[1.0, 0.0, -0.5, -1.0], [0.0, 1.0, 0.5, 0.0]],
        W_dec=[[1.0, 0.0], [0.0, 1.2], [0.0, 2.0], [0.6, 0.8]],  # |d| = 1, 1.2, 2, 1
        b_dec=b_dec,
    )
    x_c = [[2.1, 2.8], [3.0, 1.0]]  # |x_c| = 3.5 and sqrt(10)
    x = torch.tensor([[c[0] + b_dec[0], c[1] + b_dec[1]] for c in x_c])
    # token 0: a = (2.1, 2.8, 0.35, 0); a|d| = (2.1, 3.36, 0.7, 0); sorted s = (11.2896, 4.41, 0.49)
    #   c = (3.36, 3.9623, 4.0236): nearest to 3.5 at j = 1 -> keeps latent 1 only
    # token 1: a = (3, 1, 0, 0); a|d| = (3, 1.2, 0, 0); c = (3, 3.2311, 3.2311): nearest to
    #   sqrt(10) = 3.1623 at j = 2 (the first of the tie) -> keeps latents 0 and 1
    c0 = [math.sqrt(sum([11.2896, 4.41, 0.49][:j])) for j in (1, 2, 3)]
    assert min(range(3), key=lambda j: abs(c0[j] - 3.5)) + 1 == 1
    c1 = [math.sqrt(sum([9.0, 1.44, 0.0][:j])) for j in (1, 2, 3)]
    assert min(range(3), key=lambda j: abs(c1[j] - math.sqrt(10))) + 1 == 2
    f = [[0.0, 2.8, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]]
    out = sae.loss(x, TrainStep(0, 1))
    assert torch.allclose(out.codes, torch.tensor(f), atol=1e-6)
    assert torch.equal(sae.encode(x), out.codes)
    # x_hat = f W_dec + b_dec: (0.5, 2.36) and (3.5, 0.2); x = (2.6, 1.8) and (3.5, 0)
    mse = ((2.6 - 0.5) ** 2 + (1.8 - 2.36) ** 2 + 0.0 + 0.2**2) / 4  # element mean
    afa_centred = ((2.8 - 3.5) ** 2 + (math.sqrt(10) - math.sqrt(10)) ** 2) / 2
    assert math.isclose(out.terms["mse"].item(), mse, rel_tol=1e-5)
    assert math.isclose(out.terms["afa"].item(), afa_centred, rel_tol=1e-5)
    assert math.isclose(out.total.item(), mse + 0.5 * afa_centred, rel_tol=1e-5)
    # the paper's target |z| = |x|: sqrt(10) and 3.5
    literal = make("topafa", d_in=2, d_sae=4, afa_target="input")
    literal.load_state_dict(sae.state_dict())
    afa_input = ((2.8 - math.sqrt(10)) ** 2 + (math.sqrt(10) - 3.5) ** 2) / 2
    afa = literal.loss(x, TrainStep(0, 1)).terms["afa"].item()
    assert math.isclose(afa, afa_input, rel_tol=1e-5)


def test_topafa_init_defaults_and_unit_decoder():
    sae = make("topafa", d_in=8, d_sae=32)
    assert not hasattr(sae, "b_enc") and torch.equal(sae.W_enc, sae.W_dec.T)
    assert sae.lr == 3e-4 and sae.adam_betas((0.9, 0.999)) == (0.9, 0.99)
    cfg = sae.cfg
    assert (cfg.afa_coeff, cfg.aux_penalty, cfg.afa_target) == (1 / 32, 1 / 32, "centred")
    x = torch.randn(16, 8)
    step = TrainStep(0, 10)
    out = sae.loss(x, step)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step(out, x, step)  # decoder rows back at unit norm
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))


def test_topafa_k_minimises_the_norm_gap_by_brute_force():
    sae = make("topafa", k_max=31)
    randomise(sae, decoder_norms=False)
    with torch.no_grad():  # non-unit decoder rows: the ranking uses a_i |d_i|
        sae.W_dec.mul_(torch.linspace(0.5, 1.5, 32)[:, None])
    assert not hasattr(sae, "b_enc") and "b_enc" not in sae.weights()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 2
    codes = sae.encode(x)
    x_c = x - sae.b_dec
    a = torch.relu(x_c @ sae.W_enc)
    norms = sae.W_dec.norm(dim=1)
    expected = torch.zeros_like(a)
    ks = []
    for b in range(len(x)):
        order = sorted(range(32), key=lambda i: -(a[b, i] * norms[i]).item())
        gaps = [
            abs(math.sqrt(sum((a[b, i] * norms[i]).item() ** 2 for i in order[:j])) - x_c[b].norm())
            for j in range(1, 32)
        ]
        k = min(range(31), key=lambda j: gaps[j]) + 1
        ks.append(k)
        expected[b, order[:k]] = a[b, order[:k]]
    assert torch.allclose(codes, expected, atol=1e-6)
    assert len(set(ks)) > 2  # k varies per token
    # the cap: never more than k_max latents
    capped = make("topafa", k_max=2)
    capped.load_state_dict(sae.state_dict())
    assert ((capped.encode(x) != 0).sum(dim=1) <= 2).all()
    assert make("topafa", d_in=8, d_sae=32).k_cap == 31  # no cap by default (the reference)


def test_topafa_loss_by_hand():
    sae = make("topafa", d_in=4, d_sae=6, aux_k=2, afa_coeff=0.25, aux_penalty=0.5)
    randomise(sae, decoder_norms=False)
    sae.tokens_since_fired[:] = torch.tensor([10**8, 0, 10**8, 0, 0, 10**8])
    x = torch.randn(7, 4) + 1.0
    out = sae.loss(x, TrainStep(0, 1))
    f = sae.encode(x)
    a = torch.relu((x - sae.b_dec) @ sae.W_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).mean()  # element mean (reference)
    afa = ((f.norm(dim=1) - (x - sae.b_dec).norm(dim=1)) ** 2).mean()  # centred, as selected
    aux = aux_by_hand(x, x_hat, a, sae.W_dec, sae.dead_mask(), 2)
    assert aux > 0
    assert torch.isclose(out.total, mse + 0.5 * aux + 0.25 * afa, rtol=1e-5)
    assert torch.equal(out.codes, f)


def test_topafa_export_and_round_trip(tmp_path):
    sae = make("topafa", seed=1)
    randomise(sae, decoder_norms=False)
    scale = 0.4
    x = torch.randn(50, 8) * 3
    exported = sae.exported(scale)
    assert torch.allclose(exported.encode(x), sae.encode(x * scale), atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)
    exported.save(tmp_path / "sae", {}, {"seed": 1})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert cfg["saedynamics"]["loadable_by"] == ["saedynamics"]
    loaded = load(tmp_path / "sae")
    assert set(loaded.weights()) == {"W_enc", "W_dec", "b_dec"}
    assert torch.equal(loaded(x), exported(x))


# ---- adaptivek -----------------------------------------------------------------------------------


def expected_k(score: float, k_min=20, k_max=320) -> int:
    value = k_min + (k_max - k_min) / (1 + math.exp(-6 * (score / 10 - 0.5)))
    return round(min(max(value, k_min), k_max))


def test_adaptivek_equations_by_hand():
    """k = round(clamp(k_min + sigmoid(6 (s / 10 - 0.5)) (k_max - k_min), k_min, k_max)) with
    s = clamp(w . x + b, 0, 10), on four tokens whose k are worked out below."""
    sae = make("adaptivek", d_in=2, d_sae=12, k_min=2, k_max=10)
    set_parameters(sae, probe_w=[1.0, 2.0], probe_b=[0.5])
    x = torch.tensor([[1.0, 1.0], [-3.0, 0.0], [4.0, 4.0], [2.0, 0.25]])
    # w . x + b = 3.5, -2.5, 12.5, 3.0 -> s = 3.5, 0, 10, 3.0
    # 6 (s/10 - 0.5) = -0.9, -3, 3, -1.2; sigmoid = 0.28905, 0.04743, 0.95257, 0.23148
    # 2 + 8 sigmoid = 4.312, 2.379, 9.621, 3.852 -> k = 4, 2, 10, 4
    score = [3.5, 0.0, 10.0, 3.0]
    by_formula = [round(2 + 8 / (1 + math.exp(-6 * (s / 10 - 0.5)))) for s in score]
    assert by_formula == [4, 2, 10, 4]
    assert sae.score(x).tolist() == score
    assert sae.k_of(sae.score(x)).tolist() == [4, 2, 10, 4]
    # each token keeps its k largest activations
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.arange(1.0, 13.0))  # a = 1 .. 12 for every token
    kept = [[0.0] * (12 - k) + [float(v) for v in range(13 - k, 13)] for k in [4, 2, 10, 4]]
    assert sae.encode(x).tolist() == kept


def test_adaptivek_defaults_are_the_reference_run():
    sae = make("adaptivek", d_in=8, d_sae=512)
    cfg = sae.cfg
    assert (cfg.k_min, cfg.k_max, cfg.l1_weight, cfg.probe_weight) == (20, 320, 0.005, 0.05)
    assert cfg.phase_ratio == 0.9 and cfg.aux_alpha == 1 / 32 and sae.lr == 1e-3
    assert sae.default_b_dec_init == "geometric_median" and sae.unit_norm_decoder
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_adaptivek_k_follows_the_probe_and_each_token_keeps_its_k():
    sae = make("adaptivek", d_in=8, d_sae=512)
    x = torch.randn(64, 8)
    with torch.no_grad():
        sae.probe_w.copy_(torch.linspace(-1, 1, 8) * 3)
        sae.probe_b.fill_(5.0)
        sae.b_enc.fill_(10.0)  # every activation positive: each token keeps exactly its k
    raw = x @ sae.probe_w + sae.probe_b
    assert (raw < 0).any() and (raw > 10).any()  # both clamps exercised
    score = raw.clamp(0, 10)
    k = [expected_k(s) for s in score.tolist()]
    # sigmoid(-3) and sigmoid(3) at the clamped scores 0 and 10: k from 34 to 306
    assert len(set(k)) > 10 and min(k) == 34 and max(k) == 306
    assert sae.k_of(sae.score(x)).tolist() == k
    codes = sae.encode(x)
    a = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert (codes != 0).sum(dim=1).tolist() == k
    for b in range(len(x)):
        top = a[b].topk(k[b])
        assert torch.equal(codes[b, top.indices], top.values)


def test_adaptivek_probe_gets_no_gradient_from_the_sae_loss():
    sae = make("adaptivek", k_min=2, k_max=6, phase_ratio=0.5)
    x = torch.randn(64, 8)
    entropy = x[:, 0] * 2 + 3 + 0.1 * torch.randn(64)
    sae.init_from_sample(x, {"lm_entropy": entropy})
    extras = {"lm_entropy": entropy}
    probe = [sae.probe_w, sae.probe_b]
    # SAE-only phase: the total does not reach the probe
    out = sae.loss(x, TrainStep(10, 100), extras)
    assert not out.terms["probe"].requires_grad and out.terms["probe_deviation"] == 0
    assert torch.autograd.grad(out.total, probe, allow_unused=True) == (None, None)
    # joint phase: the SAE terms still do not; the total's probe gradient is the probe loss's
    with torch.no_grad():
        sae.probe_w.add_(0.1)  # away from the ridge fit, so the deviation term has a gradient
    out = sae.loss(x, TrainStep(50, 100), extras)
    sae_part = out.terms["mse"] + 0.005 * out.terms["l1"] + out.terms["auxk"] / 32
    assert torch.autograd.grad(sae_part, probe, allow_unused=True) == (None, None)
    own = 0.05 * (out.terms["probe"] + 0.2 * out.terms["probe_deviation"])
    for g_total, g_own in zip(
        torch.autograd.grad(out.total, probe, retain_graph=True),
        torch.autograd.grad(own, probe),
        strict=True,
    ):
        assert g_own.abs().sum() > 0 and torch.allclose(g_total, g_own)


def test_ridge_probe_is_the_reference_closed_form_with_cross_validated_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) + 2.0
    y = x @ torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3, 0.0]) + 4 + 0.5 * torch.randn(200, generator=g)
    for lam in RIDGE_LAMBDAS:
        w, b = ridge_fit(x, y, lam)
        # the reference: [x 1] augmented, bias column unregularised
        xa = torch.cat([x, torch.ones(200, 1)], dim=1).double()
        reg = torch.eye(7, dtype=torch.float64)
        reg[-1, -1] = 0
        solution = torch.linalg.solve(xa.T @ xa + lam * reg, xa.T @ y.double())
        assert torch.allclose(w, solution[:-1]) and torch.isclose(b, solution[-1])
    # brute-force 5-fold CV over the grid (interleaved folds), RMSE of the clamped scores
    fold = torch.arange(200) % 5

    def cv_rmse(lam):
        total = 0.0
        for f in range(5):
            w, b = ridge_fit(x[fold != f], y[fold != f], lam)
            pred = (x[fold == f].double() @ w + b).clamp(0, 10)
            total += (pred - y[fold == f]).pow(2).mean().sqrt().item() / 5
        return total

    assert ridge_cv(x, y) == min(RIDGE_LAMBDAS, key=cv_rmse)


def test_adaptivek_init_maps_entropy_to_the_probe_range():
    sae = make("adaptivek", k_min=2, k_max=6)
    x = torch.randn(500, 8)
    entropy = 1.5 + 0.4 * (x @ torch.linspace(-1, 1, 8))  # nats, a linear function of x
    sae.init_from_sample(x, {"lm_entropy": entropy})
    lo, hi = entropy.min(), entropy.max()
    assert torch.isclose(sae.target_lo, lo) and torch.isclose(sae.target_hi, hi)
    target = 10 * (entropy - lo) / (hi - lo)
    assert torch.allclose(sae.score(x), target, atol=0.05)  # a linear target is recovered
    assert torch.equal(sae.probe_w0, sae.probe_w.detach()) and sae.ridge_lambda in RIDGE_LAMBDAS
    # a constant entropy carries no information: every token gets the middle score
    flat = make("adaptivek", k_min=2, k_max=6)
    flat.init_from_sample(x, {"lm_entropy": torch.full((500,), 2.0)})
    assert torch.allclose(flat.score(x), torch.full((500,), 5.0), atol=1e-4)
    with pytest.raises(ValueError, match="lm_entropy"):
        make("adaptivek", k_min=2, k_max=6).init_from_sample(x, {})


def test_adaptivek_loss_by_hand():
    sae = make("adaptivek", d_in=4, d_sae=8, k_min=1, k_max=3, aux_k=2, phase_ratio=0.5)
    x = torch.randn(6, 4) + 0.5
    entropy = torch.rand(6) * 3
    sae.init_from_sample(x, {"lm_entropy": entropy})
    randomise(sae, decoder_norms=False)
    with torch.no_grad():
        sae.probe_w.add_(0.2)
    sae.tokens_since_fired[:] = torch.tensor([0, 10**8, 0, 0, 10**8, 10**8, 0, 0])
    sae.deviation_weight = 0.3
    out = sae.loss(x, TrainStep(60, 100), {"lm_entropy": entropy})
    score = (x @ sae.probe_w + sae.probe_b).clamp(0, 10)
    a = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = torch.zeros_like(a)
    for b in range(6):
        top = a[b].topk(expected_k(score[b].item(), 1, 3))
        f[b, top.indices] = top.values
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).mean()
    l1 = f.abs().sum(dim=1).mean() / x.norm(dim=1).mean()
    aux = aux_by_hand(x, x_hat, a, sae.W_dec, sae.dead_mask(), 2)
    target = 10 * (entropy - entropy.min()) / (entropy.max() - entropy.min())
    probe = ((score - target) ** 2).mean() + sae.ridge_lambda * (sae.probe_w**2).sum() / 2
    deviation = (sae.probe_w - sae.probe_w0).norm() + (sae.probe_b - sae.probe_b0).abs().sum()
    expected = mse + 0.005 * l1 + aux / 32 + 0.05 * (probe + 0.3 * deviation)
    assert aux > 0 and deviation > 0
    assert torch.isclose(out.total, expected, rtol=1e-5)


def test_adaptivek_deviation_weight_adapts_to_the_probe_loss():
    sae = make("adaptivek", k_min=2, k_max=6)
    x = torch.randn(4, 8)
    step = TrainStep(0, 10)
    out = sae.loss(x, step, {"lm_entropy": torch.rand(4)})
    sae.after_step(out, x, step)  # SAE-only phase: no change
    step = TrainStep(9, 10)
    out = sae.loss(x, step, {"lm_entropy": torch.rand(4)})  # joint phase
    for loss, weight in [(1.0, 0.2), (0.9, 0.2), (0.8, 0.16), (0.8, 0.128), (0.8, 0.1536)]:
        out.terms.update(probe=torch.tensor(loss), probe_deviation=torch.tensor(0.0))
        sae.after_step(out, x, step)
        assert math.isclose(sae.deviation_weight, weight), loss


def test_adaptivek_export_rescales_the_probe_and_round_trips(tmp_path):
    sae = make("adaptivek", d_in=8, d_sae=64, k_min=2, k_max=30, seed=1)
    x = torch.randn(300, 8)
    sae.init_from_sample(x * 2.0, {"lm_entropy": x[:, 0] + x[:, 1] ** 2})
    randomise(sae, decoder_norms=False)
    scale = 2.0
    exported = sae.exported(scale)
    assert torch.allclose(exported.probe_w, sae.probe_w * scale)
    assert torch.allclose(exported.score(x), sae.score(x * scale), atol=1e-5)
    assert torch.equal(exported.k_of(exported.score(x)), sae.k_of(sae.score(x * scale)))
    assert torch.allclose(exported.encode(x), sae.encode(x * scale), atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)
    exported.save(tmp_path / "sae", {}, {"seed": 1})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert cfg["saedynamics"]["loadable_by"] == ["saedynamics"]
    loaded = load(tmp_path / "sae")
    assert set(loaded.weights()) == {"W_enc", "b_enc", "W_dec", "b_dec", "probe_w", "probe_b"}
    assert torch.equal(loaded(x), exported(x))


# ---- recovery of a known dictionary (tests/synthetic.py: 3 active of 32 latents in 16 dims) ---
# A random 32 x 16 dictionary scores about 0.44 against the true one (the null), TopK at k = 3
# about 0.9 after 1M tokens. Each threshold sits between the two where the paper gives no reason
# to expect TopK's level.


@pytest.mark.slow
def test_vsae_recovers_the_dictionary_worse_than_topk(tmp_path):
    # Defaults (learned variance, sampled, KL to N(0, I) over all latents): the KL drives sigma
    # towards 1 on latents the top-k does not use, and that noise wins places in the top-k by |z|;
    # Baker, Li et al. (abstract): the vSAE "underperforms standard SAE across core evaluation
    # metrics", the KL being too strong. Measured: 0.66 and 0.65.
    mccs = recovery(tmp_path, "vsae", {"k": 3, "dead_tokens": 20_000})
    assert min(mccs) > 0.55, mccs


@pytest.mark.slow
def test_topafa_recovers_the_dictionary_above_chance(tmp_path):
    # No k: the code is cut where its norm reaches |x - b_dec|. With 32 latents in 16 dims a
    # +-orthonormal basis meets |f| = |x| exactly with ~d/2 active latents, and the norm match is
    # the method's only sparsity pressure, so it settles on dense codes (L0 ~ 11-14 here) and only
    # partly on the 3-sparse dictionary. The paper's premise is quasi-orthogonal atoms at F >> d
    # (16 x 768 on GPT-2) and it reports no recovery numbers; it is competitive only at L0 of about
    # 2 d_model (1,579-1,973 at d = 768, spec section 6). On a wider organism (64 dims, 128 latents)
    # it stays at chance too (0.42), with b_dec at 0 and without the AFA term alike: the method
    # makes dense codes, it is not a bug. Measured here: 0.54 and 0.54 (chance: 0.46).
    mccs = recovery(tmp_path, "topafa", {"dead_tokens": 20_000, "lr": 3e-3})
    assert min(mccs) > 0.5, mccs


@pytest.mark.slow
def test_adaptivek_recovers_the_dictionary_like_topk(tmp_path):
    # k from 3 to 5 around the data's 3, driven by the stand-in complexity (the summed true code,
    # synthetic.py). Yao et al. (abstract) report AdaptiveK above fixed-k TopK on reconstruction,
    # so TopK's level is expected, less a margin for k varying on data with exactly 3 active.
    # lr 3e-3, near TopK's rule at this size (2e-4 / sqrt(32 / 2^14) ~ 4.5e-3); the reference's
    # 1e-3 is for 2^14 latents. Measured: 0.87 and 0.90.
    mccs = recovery(
        tmp_path, "adaptivek", {"k_min": 3, "k_max": 5, "dead_tokens": 20_000, "lr": 3e-3}
    )
    assert min(mccs) > 0.8, mccs
