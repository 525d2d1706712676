"""The SAE interface, shared machinery and the two architectures, against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize

from saedynamics.errors import DataError
from saedynamics.saes import REGISTRY, TrainStep, load
from saedynamics.saes.base import (
    auxk_loss,
    geometric_median,
    normalise_rows_,
    remove_parallel_gradient_,
)
from saedynamics.saes.topk import topk_codes

from .synthetic import make_sae as make
from .synthetic import recovery, set_parameters, tiny


def test_registry_has_the_architectures():
    assert {"topk", "relu"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.architecture == name and cls.title


def test_tied_init_and_decoder_norms():
    topk, relu = make("topk"), make("relu")
    for sae in (topk, relu):
        assert torch.allclose(sae.W_enc, sae.W_dec.T)
        assert sae.W_dec.shape == (32, 8) and sae.W_enc.shape == (8, 32)
    assert torch.allclose(topk.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert torch.allclose(relu.W_dec.norm(dim=1), torch.full((32,), 0.1), atol=1e-6)


def test_init_is_seeded():
    assert torch.equal(make("topk", seed=3).W_dec, make("topk", seed=3).W_dec)
    assert not torch.equal(make("topk", seed=3).W_dec, make("topk", seed=4).W_dec)


def test_topk_codes_by_hand():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, -1.0, -3.0, 0.1]])
    codes = topk_codes(pre, 2)
    # row 1: keep 3 and 2; row 2: top-2 are 0.1 and -1 -> ReLU after selection zeroes -1 (OpenAI order)
    assert torch.equal(codes, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.1]]))


def test_topk_sae_encodes_k_latents_and_reconstructs():
    sae = make("topk", k=4)
    x = torch.randn(64, 8) + 3.0
    codes = sae.encode(x)
    assert ((codes != 0).sum(dim=1) <= 4).all() and (codes >= 0).all()
    pre = sae.pre_acts(x)
    assert torch.allclose(pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    out = sae.loss(x, TrainStep(0, 10))
    assert torch.allclose(out.x_hat, codes @ sae.W_dec + sae.b_dec)
    assert torch.isclose(out.terms["mse"], ((x - out.x_hat) ** 2).sum(dim=1).mean())


def test_relu_loss_by_hand():
    sae = make("relu", l1_coefficient=2.0, l1_warmup_fraction=0.5)
    x = torch.randn(16, 8)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)  # no b_dec subtracted (April 2024)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l1 = (f * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    for step, lam in [
        (TrainStep(0, 100), 0.0),
        (TrainStep(25, 100), 1.0),
        (TrainStep(80, 100), 2.0),
    ]:
        out = sae.loss(x, step)
        assert torch.isclose(out.total, mse + lam * l1, rtol=1e-5), step


def test_relu_equations_by_hand():
    """April 2024: f = ReLU(W_enc x + b_enc) (no b_dec subtracted), x_hat = W_dec f + b_dec,
    L = |x - x_hat|^2 + lambda sum_i f_i |d_i|, lambda = 5 ramped from 0 over 5% of training;
    at export f_i |d_i| with unit decoder rows."""
    sae = tiny("relu", 2, 2)  # the defaults: lambda 5, warm-up 5%
    set_parameters(
        sae,
        W_enc=[[1.0, 0.0], [1.0, 2.0]],
        b_enc=[0.0, -1.0],
        W_dec=[[0.3, 0.4], [0.0, 2.0]],  # decoder norms 0.5 and 2
        b_dec=[1.0, -1.0],
    )
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    # token 1: pre = (2, 1), x_hat = (0.6 + 1, 0.8 + 2 - 1), error (-0.6, -0.8), penalty 1 + 2
    # token 2: pre = (2, -1), x_hat = (1.6, -0.2), error (0.4, 0.2), penalty 1
    mse, l1 = (1.0 + 0.2) / 2, (3.0 + 1.0) / 2
    for step, lam in [(TrainStep(1, 100), 5.0 * 0.01 / 0.05), (TrainStep(10, 100), 5.0)]:
        out = sae.loss(x, step)
        assert np.allclose(out.codes.detach().numpy(), [[2.0, 1.0], [2.0, 0.0]])
        assert np.allclose(out.x_hat.detach().numpy(), [[1.6, 1.8], [1.6, -0.2]], atol=1e-6)
        assert out.terms["mse"].item() == pytest.approx(mse, rel=1e-5)
        assert out.terms["l1"].item() == pytest.approx(l1, rel=1e-6)
        assert out.total.item() == pytest.approx(mse + lam * l1, rel=1e-5), step  # 2.6, 10.6
    exported = sae.exported(1.0)
    assert np.allclose(exported.encode(x).detach().numpy(), [[1.0, 2.0], [1.0, 0.0]], atol=1e-6)
    assert np.allclose(exported.W_dec.detach().numpy(), [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)


def test_topk_equations_by_hand():
    """Gao et al.: z = TopK(W_enc (x - b_pre)), x_hat = W_dec z + b_pre (section 2.3);
    AuxK (A.2): the top-k_aux dead latents model e = x - x_hat, L_aux = |e - e_hat|^2 / |e - mean e|^2,
    weighted alpha = 1/32 and by V = mean |x - mean x|^2 (our unnormalised reconstruction loss);
    Multi-TopK (5.3): + L(4k) / 8."""
    sae = tiny("topk", 2, 4, k=1, aux_k=1, dead_tokens=1)
    rows = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]]
    set_parameters(sae, W_dec=rows, W_enc=np.array(rows).T, b_dec=[1.0, 1.0])
    assert not sae.b_enc.requires_grad  # the equation has no latent bias
    sae.tokens_since_fired.copy_(torch.tensor([0, 0, 5, 5]))  # latents 2 and 3 are dead
    x = torch.tensor([[3.0, 1.5], [1.5, 3.0]])
    # token 1: x - b_pre = (2, 0.5), pre = (2, 0.5, 1.6, -1.3): latent 0, x_hat = (3, 1), e = (0, .5)
    # token 2: x - b_pre = (0.5, 2), pre = (0.5, 2, 1.9, 0.8): latent 1, x_hat = (1, 3), e = (.5, 0)
    mse = (0.5**2 + 0.5**2) / 2
    # AuxK: the best dead latent is 2 on both tokens: e_hat = 1.6 d_2 = (0.96, 1.28) and
    # 1.9 d_2 = (1.14, 1.52); |e - mean e|^2 = 0.125 on each token
    aux = ((0.96**2 + 0.78**2) + (0.64**2 + 1.52**2)) / (2 * 0.125)  # 17
    variance = (2 * 0.75**2 + 2 * 0.75**2) / 2  # V = 1.125
    out = sae.loss(x, TrainStep(0, 1))
    assert np.allclose(out.codes.detach().numpy(), [[2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    assert np.allclose(out.x_hat.detach().numpy(), [[3.0, 1.0], [1.0, 3.0]], atol=1e-6)
    assert out.terms["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert out.terms["auxk"].item() == pytest.approx(aux, rel=1e-5)
    assert out.total.item() == pytest.approx(mse + variance * aux / 32, rel=1e-5)  # 0.84765625
    # Multi-TopK: 4k = 4 latents, ReLU(pre): x_hat = (3.96, 2.78) and (2.0, 5.0)
    sae.cfg = sae.cfg.model_copy(update={"multi_topk": True})
    mse_4k = ((0.96**2 + 1.28**2) + (0.5**2 + 2.0**2)) / 2  # 3.405
    out = sae.loss(x, TrainStep(0, 1))
    assert out.terms["mse_4k"].item() == pytest.approx(mse_4k, rel=1e-5)
    assert out.total.item() == pytest.approx(mse + variance * aux / 32 + mse_4k / 8, rel=1e-5)


def test_topk_encoder_init_matches_reconstruction_norm():
    """A.1: the encoder is scaled at init so that reconstructions have the inputs' norm."""
    sae = make("topk", k=4)
    x = torch.randn(256, 8) * 3.0 + 1.0
    W_dec = sae.W_dec.detach().numpy().copy()
    sae.init_from_sample(x)
    W_enc, b_pre = sae.W_enc.detach().numpy(), sae.b_dec.detach().numpy()
    scale = W_enc[0, 0] / W_dec[0, 0]
    assert np.allclose(W_enc, scale * W_dec.T, rtol=1e-5) and scale != pytest.approx(1.0)
    # by hand: top-4 of ReLU((x - b_pre) W_enc), decoded without b_pre
    centred = x.numpy() - b_pre
    pre = centred @ W_enc
    kth = np.sort(pre, axis=1)[:, -4][:, None]
    codes = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    norms = np.linalg.norm(codes @ W_dec, axis=1)
    assert norms.mean() == pytest.approx(np.linalg.norm(centred, axis=1).mean(), rel=1e-4)
    unscaled = make("topk", k=4, encoder_init_rescale=False)
    unscaled.init_from_sample(x)
    assert torch.allclose(unscaled.W_enc, unscaled.W_dec.T)
    assert make("topk", encoder_bias=True).b_enc.requires_grad


def test_auxk_by_hand():
    # 2 tokens, 4 latents (3 dead), d = 2, k_aux = 2
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    pre = torch.tensor([[9.0, 1.0, 2.0, -1.0], [9.0, 3.0, -5.0, 0.5]])
    W_dec = torch.tensor([[5.0, 5.0], [0.1, 0.0], [0.0, 0.1], [0.2, 0.2]])
    dead = torch.tensor([False, True, True, True])  # latent 0 is alive: never used, despite pre 9
    # token 1: top-2 dead are latents 2 (2.0) and 1 (1.0): e_hat = 2*(0,.1) + 1*(.1,0) = (.1,.2)
    # token 2: top-2 dead are latents 1 (3.0) and 3 (0.5): e_hat = 3*(.1,0) + .5*(.2,.2) = (.4,.1)
    e = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    e_hat = torch.tensor([[0.1, 0.2], [0.4, 0.1]])
    expected = ((e - e_hat) ** 2).sum() / ((e - e.mean(dim=0)) ** 2).sum()
    assert torch.isclose(auxk_loss(x, x_hat, pre, W_dec, dead, k_aux=2), expected)
    # fewer dead latents than k_aux: uses all of them; none dead: exactly 0
    assert torch.isfinite(auxk_loss(x, x_hat, pre, W_dec, dead, k_aux=10))
    assert auxk_loss(x, x_hat, pre, W_dec, torch.zeros(4, dtype=torch.bool), 2) == 0


def test_auxk_gradient_reaches_encoder_not_residual():
    sae = make("topk", k=2, dead_tokens=1)
    sae.tokens_since_fired.fill_(10)  # everything dead
    x = torch.randn(8, 8)
    out = sae.loss(x, TrainStep(0, 1))
    aux = out.terms["auxk"]
    assert aux > 0
    grads = torch.autograd.grad(aux, [sae.W_enc, sae.W_dec])
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


def test_geometric_median_against_numerical_minimum():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 3)), rng.normal(loc=20, size=(5, 3))])  # outliers
    found = geometric_median(torch.tensor(x, dtype=torch.float32)).numpy()
    res = minimize(
        lambda g: np.linalg.norm(x - g, axis=1).sum(),
        x.mean(axis=0),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000},
    )
    assert np.allclose(found, res.x, atol=1e-3)
    assert np.linalg.norm(found) < np.linalg.norm(x.mean(axis=0))  # robust to the outliers


def test_gradient_projection_and_renormalisation():
    w = torch.nn.Parameter(torch.randn(6, 4))
    normalise_rows_(w)
    assert torch.allclose(w.norm(dim=1), torch.ones(6), atol=1e-6)
    w.grad = torch.randn(6, 4)
    remove_parallel_gradient_(w)
    assert torch.allclose((w.grad * w.data).sum(dim=1), torch.zeros(6), atol=1e-6)


def test_after_step_keeps_unit_decoder_and_counts_dead_tokens():
    sae = make("topk", k=2, dead_tokens=10)
    sae.W_dec.data.mul_(3.0)
    x = torch.randn(4, 8)
    step = TrainStep(0, 1)
    out = sae.loss(x, step)
    out.codes = torch.zeros(4, 32)
    out.codes[0, 5] = 1.0
    sae.after_step(out, x, step)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert sae.tokens_since_fired[5] == 0 and sae.tokens_since_fired[0] == 4
    out.codes = torch.zeros(8, 32)
    sae.after_step(out, torch.randn(8, 8), step)
    assert sae.dead_mask().sum() == 31 and not sae.dead_mask()[5]


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_export_folds_scale_and_decoder_norms_exactly(name):
    sae = make(name, seed=1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, 32)[:, None]) if name == "relu" else None
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    scale = 2.5
    x = torch.randn(50, 8)
    exported = sae.exported(scale)
    codes_train = sae.encode(x * scale)
    codes_export = exported.encode(x)
    if name == "relu":  # codes are rescaled by the decoder norms, the reconstruction is not
        codes_train = codes_train * sae.W_dec.norm(dim=1)
        assert torch.allclose(exported.W_dec.norm(dim=1) * scale, torch.ones(32), atol=1e-5)
    assert torch.allclose(codes_export, codes_train, atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_save_load_round_trip(tmp_path, name):
    sae = make(name, seed=2)
    sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 2})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert (
        cfg["architecture"] == sae.saelens_architecture and cfg["d_in"] == 8 and cfg["d_sae"] == 32
    )
    assert cfg["saedynamics"]["architecture"] == name and cfg["saedynamics"]["seed"] == 2
    assert set(load_file(tmp_path / "sae/sae_weights.safetensors")) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
    }
    loaded = load(tmp_path / "sae")
    x = torch.randn(10, 8)
    assert type(loaded) is type(sae) and torch.equal(loaded(x), sae(x))


def test_load_rejects_bad_directories(tmp_path):
    sae = make("topk")
    sae.save(tmp_path / "ok", {}, {})
    with pytest.raises(DataError, match="not a readable SAE directory"):
        load(tmp_path / "missing")
    # a tensor missing
    bad = tmp_path / "missing_tensor"
    bad.mkdir()
    (bad / "cfg.json").write_text((tmp_path / "ok/cfg.json").read_text())
    tensors = load_file(tmp_path / "ok/sae_weights.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "b_dec"}, bad / "sae_weights.safetensors")
    with pytest.raises(DataError, match="do not match cfg.json"):
        load(bad)
    # wrong shapes in cfg.json
    cfg = json.loads((tmp_path / "ok/cfg.json").read_text())
    cfg["d_sae"] = 16
    (bad / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, bad / "sae_weights.safetensors")
    with pytest.raises(DataError, match="do not match cfg.json"):
        load(bad)
    cfg["saedynamics"]["architecture"] = "nope"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="'nope' is not registered"):
        load(bad)


def test_adam_betas_per_architecture():
    fallback = (0.9, 0.999)
    assert make("topk").adam_betas(fallback) == fallback
    assert make("jumprelu").adam_betas(fallback) == (0.0, 0.999)  # GDM's beta1 = 0
    assert make("jumprelu", adam_betas=(0.5, 0.9)).adam_betas(fallback) == (0.5, 0.9)
    with pytest.raises(ValueError, match="betas must be in"):
        make("topk", adam_betas=(0.9, 1.5))


@pytest.mark.slow
def test_topk_recovers_the_dictionary(tmp_path):
    # Song, Muhamed et al. 2025: TopK at the true k reaches near-1 ground-truth MCC on this organism
    # (after 30k full-batch steps). Here 3M tokens, the dead window scaled to the run so that AuxK
    # acts. Measured: 0.94-0.96 (chance: 0.46).
    mccs = recovery(tmp_path, "topk", {"k": 3, "dead_tokens": 20_000}, train_tokens=3_000_000)
    assert min(mccs) > 0.9, mccs


@pytest.mark.slow
def test_relu_recovers_the_dictionary(tmp_path):
    # Song et al.: L1 SAEs lag TopK on this organism. Lambda set for L0 near 3. Measured: 0.95, 0.95.
    mccs = recovery(tmp_path, "relu", {"l1_coefficient": 1.0, "lr": 0.004})
    assert min(mccs) > 0.88, mccs
