"""The L1/L0-penalty architectures: relu_2023 (Towards Monosemanticity, with resampling), jumprelu
and gated, against hand-computed values, SAELens, and the synthetic recovery organism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from saedynamics.saes import REGISTRY, TrainStep, load
from saedynamics.saes.jumprelu import JumpReLU, Step
from tests.synthetic import make_sae as make
from tests.synthetic import recovery, set_parameters, tiny

NAMES = ["relu_2023", "jumprelu", "gated"]
TENSORS = {
    "relu_2023": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and spares a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def randomise(sae, seed=0):
    """Non-trivial parameters: random biases, thresholds, magnitude scales; unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        if name.startswith("b_") or name == "r_mag":
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif name == "W_enc":
            p.mul_(1 + torch.rand(p.shape, generator=g))
    if hasattr(sae, "log_threshold"):
        sae.log_threshold.copy_(torch.empty(sae.d_sae).uniform_(-2.0, 0.0, generator=g))
    return sae


def train_steps(sae, batches, total, start=0):
    """The trainer's calls, in its order."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.attach_optimizer(opt)
    for i, x in enumerate(batches, start=start):
        step = TrainStep(i, total)
        out = sae.loss(x, step)
        opt.zero_grad()
        out.total.backward()
        sae.before_step()
        opt.step()
        sae.after_step(out, x, step)
    return opt


# ---- configuration -------------------------------------------------------------------------------


def test_registered_with_saelens_names():
    for name in NAMES:
        cls = REGISTRY[name]
        assert cls.architecture == name and cls.title and cls.unit_norm_decoder
    assert REGISTRY["relu_2023"].saelens_architecture == "standard"
    assert REGISTRY["jumprelu"].saelens_architecture == "jumprelu"
    assert REGISTRY["gated"].saelens_architecture == "gated"


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("relu_2023", {"l1_coefficient": -1.0}),
        ("relu_2023", {"l1_warmup_fraction": 1.5}),
        ("relu_2023", {"resample_at": [0.5, 1.2]}),
        ("relu_2023", {"resample_at": [0.0]}),
        ("relu_2023", {"resample_at": [0.4, 0.2]}),
        ("relu_2023", {"resample_sample_tokens": 0}),
        ("relu_2023", {"resample_encoder_scale": -0.2}),
        ("jumprelu", {"l0_coefficient": -1.0}),
        ("jumprelu", {"bandwidth": 0.0}),
        ("jumprelu", {"bandwidth": -0.1}),
        ("jumprelu", {"init_threshold": -0.1}),
        ("jumprelu", {"l0_input": "post"}),
        ("jumprelu", {"l0_warmup_fraction": -0.1}),
        ("gated", {"l1_coefficient": -1.0}),
        ("gated", {"l1_warmup_fraction": 2.0}),
    ],
)
def test_bad_hyperparameters_fail_validation(name, hyper):
    with pytest.raises(ValidationError):
        REGISTRY[name].Config(architecture=name, **hyper)


def test_init():
    relu, jump, gated = (make(n) for n in NAMES)
    for sae in (relu, jump, gated):
        assert torch.allclose(sae.W_enc, sae.W_dec.T)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    # the paper's theta_0 = 0.001 at E|x|^2 = 1, in the trainer's units (E|x|^2 = d_in = 8)
    assert torch.allclose(jump.threshold, torch.full((32,), 0.001 * 8**0.5))
    assert jump.bandwidth == pytest.approx(0.001 * 8**0.5)
    assert not hasattr(gated, "b_enc")
    for p in (gated.b_gate, gated.r_mag, gated.b_mag, gated.b_dec):
        assert torch.equal(p, torch.zeros_like(p))
    # b_dec: geometric median for relu_2023 (Bricken), zero for the GDM architectures
    x = torch.randn(256, 8) + 5.0
    relu.init_from_sample(x)
    jump.init_from_sample(x)
    assert (relu.b_dec - 5.0).abs().max() < 0.5 and torch.equal(jump.b_dec, torch.zeros(8))


# ---- losses by hand --------------------------------------------------------------------------


def test_relu_2023_loss_by_hand():
    sae = randomise(make("relu_2023", l1_coefficient=2.0, l1_warmup_fraction=0.5))
    x = torch.randn(16, 8)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # b_dec subtracted (tied pre-bias)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l1 = f.abs().sum(dim=1).mean()  # not weighted by decoder norms
    assert (f > 0).any() and (f == 0).any()
    for step, lam in [
        (TrainStep(0, 100), 0.0),
        (TrainStep(25, 100), 1.0),
        (TrainStep(80, 100), 2.0),
    ]:
        out = sae.loss(x, step)
        assert torch.isclose(out.total, mse + lam * l1, rtol=1e-5), step
        assert torch.allclose(out.codes, f) and torch.allclose(out.x_hat, x_hat)


def test_jumprelu_loss_by_hand():
    sae = randomise(make("jumprelu", l0_coefficient=0.3, l0_warmup_fraction=0.0))
    x = torch.randn(16, 8)
    pre = x @ sae.W_enc + sae.b_enc  # no b_dec subtracted
    theta = sae.log_threshold.exp()
    f = torch.where(pre > theta, pre, 0.0)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l0 = (pre > theta).sum(dim=1).float().mean()
    assert 0 < l0 < 32 and ((pre > 0) & (pre <= theta)).any()  # ReLU alone would keep those
    out = sae.loss(x, TrainStep(3, 10))
    assert torch.isclose(out.terms["l0"], l0) and torch.isclose(out.total, mse + 0.3 * l0)
    assert torch.allclose(out.codes, f) and torch.allclose(sae.encode(x), f)


def test_gated_loss_by_hand():
    sae = randomise(make("gated", l1_coefficient=0.7, l1_warmup_fraction=0.0))
    x = torch.randn(16, 8)
    x_c = x - sae.b_dec
    pi_gate = x_c @ sae.W_enc + sae.b_gate
    pi_mag = x_c @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).float() * pi_mag.relu()
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l1 = pi_gate.relu().sum(dim=1).mean()
    aux = ((x - (pi_gate.relu() @ sae.W_dec + sae.b_dec)) ** 2).sum(dim=1).mean()
    assert ((pi_gate > 0) & (pi_mag <= 0)).any() and ((pi_gate <= 0) & (pi_mag > 0)).any()
    out = sae.loss(x, TrainStep(0, 1))
    assert torch.isclose(out.total, mse + 0.7 * l1 + aux, rtol=1e-5)
    for key, value in {"mse": mse, "l1": l1, "aux": aux}.items():
        assert torch.isclose(out.terms[key], value, rtol=1e-5), key
    assert torch.allclose(out.codes, f) and torch.allclose(sae.encode(x), f)


# ---- defining equations, on examples small enough to compute by hand -----------------------------


def test_relu_2023_equations_by_hand():
    """Bricken et al.: f = ReLU(W_e (x - b_d) + b_e), x_hat = W_d f + b_d, L = |x - x_hat|^2
    + lambda |f|_1; resampling draws inputs with p = loss^2 / sum loss^2 and sets
    d_i = x/|x|, W_e[:, i] = 0.2 * mean live encoder norm * x/|x|, b_e,i = 0."""
    sae = tiny("relu_2023", 2, 3, l1_coefficient=2.0, l1_warmup_fraction=0.0)
    set_parameters(
        sae,
        W_enc=[[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]],  # encoder norms 1, 1.118, 2
        b_enc=[0.0, -0.5, 0.1],
        W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
        b_dec=[1.0, 1.0],
    )
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    # token 1: x - b_d = (1, 0), pre = (1, 0, 0.1), x_hat = (1 + 0.06 + 1, 0.08 + 1)
    # token 2: x - b_d = (0, 2), pre = (0, 1.5, 4.1), x_hat = (2.46 + 1, 1.5 + 3.28 + 1)
    codes = [[1.0, 0.0, 0.1], [0.0, 1.5, 4.1]]
    x_hat = [[2.06, 1.08], [3.46, 5.78]]
    losses = [0.06**2 + 0.08**2, 2.46**2 + 2.78**2]  # 0.01, 13.78
    mse, l1 = sum(losses) / 2, (1.1 + 5.6) / 2
    out = sae.loss(x, TrainStep(0, 10))
    assert np.allclose(out.codes.detach().numpy(), codes, atol=1e-6)
    assert np.allclose(out.x_hat.detach().numpy(), x_hat, atol=1e-5)
    assert out.terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.terms["l1"].item() == pytest.approx(l1, rel=1e-6)
    assert out.total.item() == pytest.approx(mse + 2.0 * l1, rel=1e-5)  # 13.595

    squared = np.array(losses) ** 2
    assert np.allclose(sae.resampling_probabilities(x).numpy(), squared / squared.sum())
    # latent 1 is dead; token 2 is drawn (p = 1 - 5e-7); live encoder norms 1 and 2
    sae.fired_since_resample.copy_(torch.tensor([True, False, True]))
    sae.generator = torch.Generator().manual_seed(0)
    assert sae.resample(x).tolist() == [1]
    direction = np.array([1.0, 3.0]) / np.sqrt(10.0)
    assert np.allclose(sae.W_dec[1].detach().numpy(), direction, atol=1e-6)
    assert np.allclose(
        sae.W_enc[:, 1].detach().numpy(), 0.2 * (1.0 + 2.0) / 2 * direction, atol=1e-6
    )
    assert sae.b_enc[1].item() == 0.0


def test_jumprelu_equations_by_hand():
    """f = z H(z - theta); L = |x - x_hat|^2 + lambda sum_i H(z_i - theta_i) (eqs. 8-10);
    pseudo-derivatives -(theta/eps) K and -(1/eps) K, K(u) = 1[|u| < 1/2] (eqs. 11, 12),
    times theta for the trained log theta."""
    eps, lam, theta = 0.2, 0.6, 0.5  # windows: |z - 0.5| < 0.1
    sae = tiny("jumprelu", 2, 2, bandwidth=eps, l0_coefficient=lam, l0_warmup_fraction=0.0)
    eye = [[1.0, 0.0], [0.0, 1.0]]
    set_parameters(sae, W_enc=eye, W_dec=eye, log_threshold=[np.log(theta)] * 2)
    # pre = x: latent 0 sees 0.45 (below theta, in the window), 0.58 (above, in it), 0.9;
    # latent 1 sees 0.3, 0.62 and 0.75, none in its window
    x = torch.tensor([[0.45, 0.3], [0.58, 0.62], [0.9, 0.75]])
    out = sae.loss(x, TrainStep(0, 1))
    assert np.allclose(out.codes.detach().numpy(), [[0, 0], [0.58, 0.62], [0.9, 0.75]])
    mse, l0 = (0.45**2 + 0.3**2) / 3, 4 / 3
    assert out.terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out.terms["l0"].item() == pytest.approx(l0, rel=1e-6)
    assert out.total.item() == pytest.approx(mse + lam * l0, rel=1e-5)  # 0.8975

    grad = torch.autograd.grad(out.total, sae.log_threshold)[0].numpy()
    # latent 0: reconstruction, token 0.45: dL/df = -2 * 0.45 / 3 = -0.3, times -(theta/eps)
    # = -2.5: +0.75; the 0.58 token is reconstructed exactly (dL/df = 0). L0: two tokens in
    # the window, lambda / B * -(1/eps) each: 0.2 * -5 * 2 = -2. Chain factor theta = 0.5.
    assert np.allclose(grad, [theta * (0.75 - 2.0), 0.0], atol=1e-6)  # -0.625
    # appendix J's alternative: the step sees f, which is 0 for the 0.45 token (outside)
    sae.cfg = sae.cfg.model_copy(update={"l0_input": "magnitude"})
    out = sae.loss(x, TrainStep(0, 1))
    grad = torch.autograd.grad(out.total, sae.log_threshold)[0].numpy()
    assert np.allclose(grad, [theta * (0.75 - 1.0), 0.0], atol=1e-6)  # -0.125


def test_gated_equations_by_hand():
    """pi_gate = (x - b_dec) W_gate + b_gate, pi_mag = (x - b_dec) (W_gate exp(r_mag)) + b_mag,
    f = 1[pi_gate > 0] ReLU(pi_mag); L = |x - x_hat|^2 + lambda |ReLU(pi_gate)|_1
    + |x - (ReLU(pi_gate) sg(W_dec) + sg(b_dec))|^2."""
    sae = tiny("gated", 2, 2, l1_coefficient=0.7, l1_warmup_fraction=0.0)
    set_parameters(
        sae,
        W_enc=[[1.0, -1.0], [0.5, 1.0]],  # W_gate
        b_gate=[0.2, -0.1],
        r_mag=[np.log(2.0), 0.0],  # the magnitude path scales latent 0 by 2
        b_mag=[-0.5, 0.3],
        W_dec=[[1.0, 0.0], [0.6, 0.8]],
        b_dec=[0.5, -0.5],
    )
    x = torch.tensor([[1.5, 0.5], [0.5, 1.0]])
    # token 1: x_c = (1, 1): pi_gate = (1.7, -0.1), pi_mag = (2.5, 0.3): latent 1 gated off
    # token 2: x_c = (0, 1.5): pi_gate = (0.95, 1.4), pi_mag = (1.0, 1.8)
    codes = [[2.5, 0.0], [1.0, 1.8]]
    x_hat = [[3.0, -0.5], [2.58, 0.94]]
    mse = ((1.5**2 + 1.0**2) + (2.08**2 + 0.06**2)) / 2  # 3.79
    l1 = (1.7 + (0.95 + 1.4)) / 2  # 2.025
    # the gate's reconstructions: (2.2, -0.5) and (2.29, 0.62)
    aux = ((0.7**2 + 1.0**2) + (1.79**2 + 0.38**2)) / 2  # 2.41925
    out = sae.loss(x, TrainStep(0, 1))
    assert np.allclose(out.codes.detach().numpy(), codes, atol=1e-6)
    assert np.allclose(out.x_hat.detach().numpy(), x_hat, atol=1e-6)
    for key, value in {"mse": mse, "l1": l1, "aux": aux}.items():
        assert out.terms[key].item() == pytest.approx(value, rel=1e-5), key
    assert out.total.item() == pytest.approx(mse + 0.7 * l1 + aux, rel=1e-5)  # 7.62675
    # with tied weights the gate is a JumpReLU of pi_mag at theta = b_mag - exp(r_mag) b_gate
    pi_mag = np.array([[2.5, 0.3], [1.0, 1.8]])
    theta = np.array([-0.5 - 2.0 * 0.2, 0.3 - 1.0 * -0.1])  # (-0.9, 0.4)
    assert np.allclose(np.where(pi_mag > theta, np.maximum(pi_mag, 0), 0.0), codes)


# ---- defining properties -------------------------------------------------------------------------


@pytest.mark.parametrize("l0_input", ["pre", "magnitude"])
def test_jumprelu_threshold_pseudo_gradient(l0_input):
    """d loss / d log_theta = theta * [ sum_b dL/df * -(theta/eps) K((pre - theta)/eps)
    + lambda/B * sum_b -(1/eps) K((z - theta)/eps) ], K(u) = 1[|u| < 1/2], z = pre or f."""
    eps, lam = 0.4, 0.3
    sae = randomise(make("jumprelu", bandwidth=eps, l0_coefficient=lam, l0_warmup_fraction=0.0))
    sae.cfg = sae.cfg.model_copy(update={"l0_input": l0_input})
    with torch.no_grad():  # theta >= eps / 2: a code of 0 lies outside every window
        sae.log_threshold.uniform_(-1.2, 0.0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 8)
    out = sae.loss(x, TrainStep(0, 1))
    grad_log_theta, grad_b_enc = torch.autograd.grad(out.total, [sae.log_threshold, sae.b_enc])

    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        theta = sae.log_threshold.exp()
        f = torch.where(pre > theta, pre, 0.0)
        x_hat = f @ sae.W_dec + sae.b_dec
        dmse_df = 2 * (x_hat - x) @ sae.W_dec.T / len(x)
        window = ((pre - theta) / eps).abs() < 0.5
        z = pre if l0_input == "pre" else f
        window_l0 = ((z - theta) / eps).abs() < 0.5
        d_theta = (dmse_df * -(theta / eps) * window).sum(0) + lam / len(x) * (
            -(1 / eps) * window_l0
        ).sum(0)
        expected = theta * d_theta  # the chain factor of theta = exp(log_theta)
        # the encoder sees only the reconstruction, through 1[pre > theta] (L0: d/dz = 0)
        expected_b_enc = (dmse_df * (pre > theta)).sum(0)
    assert window.any() and window_l0.any()
    assert torch.allclose(grad_log_theta, expected, atol=1e-6)
    assert torch.allclose(grad_b_enc, expected_b_enc, atol=1e-6)
    if l0_input == "magnitude":  # only the half window above theta is seen (spec 4, pitfall 2)
        below = window & (pre <= theta)
        assert below.any() and not (window_l0 & below).any()


def test_jumprelu_functions_directly():
    z = torch.tensor([[0.9, 1.04, 1.2], [0.5, 0.97, 1.06]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    eps = 0.1  # window |z - theta| < 0.05
    y = JumpReLU.apply(z, theta, eps)
    assert torch.equal(y.detach(), torch.tensor([[0.0, 1.04, 1.2], [0.0, 0.0, 1.06]]))
    gz, gt = torch.autograd.grad(y.sum(), [z, theta])
    assert torch.equal(gz, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    # in the window: 1.04 and 0.97, both in column 1 (one above theta, one below)
    assert torch.allclose(gt, torch.tensor([0.0, -2 * 1.0 / eps, 0.0]))
    s = Step.apply(z, theta, eps)
    gz, gt = torch.autograd.grad(s.sum(), [z, theta], allow_unused=True)
    assert gz is None or torch.equal(gz, torch.zeros_like(z))
    assert torch.allclose(gt, torch.tensor([0.0, -2 / eps, 0.0]))


def test_gated_paths_share_one_weight():
    sae = randomise(make("gated"))
    names = {n for n, _ in sae.named_parameters()}
    assert names == TENSORS["gated"]  # no separate magnitude weight, no b_enc
    x = torch.randn(16, 8)
    gate0, mag0 = sae.gate_and_magnitude(x)
    with torch.no_grad():
        sae.W_enc[:, 3] += torch.randn(8)
    gate1, mag1 = sae.gate_and_magnitude(x)
    changed = torch.zeros(32, dtype=torch.bool)
    changed[3] = True
    for before, after in ((gate0, gate1), (mag0, mag1)):
        assert not torch.allclose(before[:, 3], after[:, 3])
        assert torch.equal(before[:, ~changed], after[:, ~changed])
    # and the magnitude weight is exactly W_gate rescaled per latent by exp(r_mag)
    assert torch.allclose(mag1 - sae.b_mag, (gate1 - sae.b_gate) * sae.r_mag.exp(), atol=1e-5)


def test_gated_aux_term_uses_a_frozen_decoder():
    sae = randomise(make("gated"))
    x = torch.randn(32, 8)
    out = sae.loss(x, TrainStep(0, 1))
    aux = out.terms["aux"]
    g_wdec, g_bdec, g_wenc, g_bgate = torch.autograd.grad(
        aux, [sae.W_dec, sae.b_dec, sae.W_enc, sae.b_gate], allow_unused=True
    )
    assert g_wdec is None or torch.equal(g_wdec, torch.zeros_like(sae.W_dec))
    assert g_wenc.abs().sum() > 0 and g_bgate.abs().sum() > 0  # it trains the gate
    # b_dec: only its input-side role (x_c = x - b_dec feeds pi_gate), none as a decoder bias
    with torch.no_grad():
        pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
        r = x - (pi_gate.relu() @ sae.W_dec + sae.b_dec)
        d_pi = -2 * (r @ sae.W_dec.T) * (pi_gate > 0) / len(x)
        expected = -(d_pi @ sae.W_enc.T).sum(0)
    assert torch.allclose(g_bdec, expected, atol=1e-6)
    # the reconstruction term cannot train the gate: its only path is the auxiliary term
    g = torch.autograd.grad(out.terms["mse"], [sae.b_gate], allow_unused=True)[0]
    assert g is None or torch.equal(g, torch.zeros_like(sae.b_gate))


def test_gated_fold_decoder_norm_is_exact():
    sae = randomise(make("gated"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, 32)[:, None])
    x = torch.randn(20, 8)
    before = sae(x)
    sae.fold_decoder_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    assert torch.allclose(sae(x), before, atol=1e-5)


def test_relu_2023_resampling_revives_a_dead_latent():
    torch.manual_seed(0)
    sae = make("relu_2023", l1_coefficient=0.1, resample_at=[0.5])
    dead = 7
    with torch.no_grad():  # latent 7 cannot fire
        sae.W_enc[:, dead] = 0.0
        sae.b_enc[dead] = -10.0
    opt = train_steps(sae, [torch.randn(64, 8) for _ in range(5)], total=100)
    assert not sae.fired_since_resample[dead] and sae.b_enc[dead] == -10.0
    sae.fired_since_resample.fill_(True)  # the others count as alive: only latent 7 is resampled
    sae.fired_since_resample[dead] = False
    live = torch.arange(32) != dead
    live_norm = sae.W_enc[:, live].norm(dim=0).mean()
    old = {}
    for p in (sae.W_enc, sae.W_dec, sae.b_enc):  # non-zero moments everywhere
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key].copy_(torch.rand(p.shape) + 0.1)
        old[p] = {key: opt.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    inputs = torch.randn(500, 8) + 1.0
    with torch.no_grad():
        sae.b_dec.zero_()
    W_enc_before, W_dec_before = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    resampled = sae.resample(inputs)
    assert resampled.tolist() == [dead]

    d = sae.W_dec[dead]
    matches = (inputs / inputs.norm(dim=1, keepdim=True) - d).norm(dim=1) < 1e-6
    assert matches.sum() == 1  # the decoder row is one of the inputs, normalised
    x = inputs[matches]
    assert torch.allclose(sae.W_enc[:, dead], d * 0.2 * live_norm, atol=1e-6)
    assert sae.b_enc[dead] == 0
    assert sae.encode(x)[0, dead] > 0  # it fires on the input it was drawn from
    # everything else untouched; Adam moments zeroed exactly at the modified entries
    assert torch.equal(sae.W_enc[:, live], W_enc_before[:, live])
    assert torch.equal(sae.W_dec[live], W_dec_before[live])
    moments = opt.state
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(moments[sae.W_dec][key][dead], torch.zeros(8))
        assert torch.equal(moments[sae.W_enc][key][:, dead], torch.zeros(8))
        assert moments[sae.b_enc][key][dead] == 0
        assert torch.equal(moments[sae.W_dec][key][live], old[sae.W_dec][key][live])
        assert torch.equal(moments[sae.W_enc][key][:, live], old[sae.W_enc][key][:, live])
        assert torch.equal(moments[sae.b_enc][key][live], old[sae.b_enc][key][live])
    assert not sae.fired_since_resample.any()  # the next window starts now


def test_relu_2023_resampling_draws_inputs_by_squared_loss():
    sae = make("relu_2023")
    with torch.no_grad():
        sae.W_enc.zero_()  # x_hat = b_dec = 0: per-token loss = |x|^2
    inputs = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0, 0, 0]])
    # loss 1 and 4, weights loss^2 = 1 and 16: the second input is drawn with p = 16/17
    # (the resampled encoder row is 0.2 x the mean live norm = 0: the losses stay as they are)
    sae.generator = torch.Generator().manual_seed(0)
    n, second = 400, 0  # p = 0.8 (weights |x - x_hat|^2, unsquared) is 12 sigma away
    for _ in range(n):
        sae.fired_since_resample.fill_(True)
        sae.fired_since_resample[0] = False
        sae.resample(inputs)
        second += int(sae.W_dec[0, 1] == 1.0)
    p = 16 / 17
    assert abs(second / n - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_relu_2023_resamples_on_schedule_from_recent_batches():
    torch.manual_seed(1)
    sae = make("relu_2023", l1_coefficient=0.1, resample_at=[0.3, 0.6], resample_sample_tokens=100)
    with torch.no_grad():  # latent 5 can never fire
        sae.W_enc[:, 5] = 0.0
        sae.b_enc[5] = -100.0
    batches = [torch.randn(64, 8) for _ in range(20)]
    train_steps(sae, batches[:6], total=20)  # steps 0-5: resampling is due at step 6
    assert sae.b_enc[5] < -99 and sum(len(b) for b in sae.recent_inputs) <= 100 + 64
    train_steps(sae, batches[6:7], total=20, start=6)
    assert sae.b_enc[5] == 0 and sae.recent_inputs == []
    # its new decoder row is one of the last 100 training tokens, normalised
    seen = torch.cat(batches[:7])
    hit = ((seen / seen.norm(dim=1, keepdim=True) - sae.W_dec[5]).norm(dim=1) < 1e-5).nonzero()
    assert len(hit) == 1 and hit.item() >= 7 * 64 - 100
    # after the last resampling (step 12) nothing more is kept
    train_steps(sae, batches[7:20], total=20, start=7)
    assert sae.recent_inputs == []


# ---- export, save, load, SAELens -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_folds_scale_exactly(name):
    sae = randomise(make(name, seed=1))
    scale = 2.5
    x = torch.randn(50, 8)
    exported = sae.exported(scale)
    codes = sae.encode(x * scale)
    assert (codes != 0).any() and (codes == 0).any()
    assert torch.allclose(exported.encode(x), codes, atol=1e-5)
    assert torch.allclose(exported(x), sae(x * scale) / scale, atol=1e-5)
    assert torch.allclose(exported.W_dec.norm(dim=1) * scale, torch.ones(32), atol=1e-5)
    if name == "jumprelu":  # thresholds act on pre-activations, which the fold leaves unchanged
        assert torch.allclose(exported.threshold, sae.threshold)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(tmp_path, name):
    sae = randomise(make(name, seed=2))
    sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 2})
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    assert cfg["architecture"] == sae.saelens_architecture
    assert cfg["apply_b_dec_to_input"] is (name != "jumprelu")
    assert cfg["saedynamics"]["architecture"] == name
    tensors = load_file(tmp_path / "sae/sae_weights.safetensors")
    assert set(tensors) == TENSORS[name]
    loaded = load(tmp_path / "sae")
    assert type(loaded) is type(sae)
    for key, value in sae.weights().items():
        assert torch.allclose(loaded.weights()[key], value, rtol=1e-6), key
    x = torch.randn(10, 8)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)
    if name == "jumprelu":
        assert torch.allclose(tensors["threshold"], sae.threshold.detach())
        # the saved threshold is read into log_threshold, not ignored as an unexpected key
        result = make(name).load_state_dict(tensors, strict=False)
        assert result.unexpected_keys == [] and result.missing_keys == ["tokens_since_fired"]


@pytest.mark.parametrize("name", NAMES)
def test_saelens_loads_our_files(tmp_path, name):
    """SAELens reads the saved directory; encode/decode agree with ours to 1e-5 (float32)."""
    from sae_lens import SAE as SAELensSAE

    sae = randomise(make(name, seed=3)).exported(1.7)
    sae.save(tmp_path / "sae", {}, {})
    theirs = SAELensSAE.load_from_disk(tmp_path / "sae")
    assert (
        type(theirs).__name__
        == {
            "relu_2023": "StandardSAE",
            "jumprelu": "JumpReLUSAE",
            "gated": "GatedSAE",
        }[name]
    )
    x = torch.randn(200, 8) * 3 + 1
    with torch.no_grad():
        ours_codes, their_codes = sae.encode(x), theirs.encode(x)
        assert (ours_codes != 0).any() and (ours_codes == 0).any()
        assert torch.allclose(their_codes, ours_codes, atol=1e-5)
        assert torch.allclose(theirs.decode(ours_codes), sae.decode(ours_codes), atol=1e-5)
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)


# ---- recovery of a known dictionary --------------------------------------------------------------
# The organism: 32 unit directions in 16 dims, k = 3 active per sample. `relu` (ReLU + L1) reaches
# ~0.95 here. Thresholds leave ~0.05 below what each architecture reached when it was set.


@pytest.mark.slow
def test_relu_2023_recovers_the_dictionary(tmp_path):
    # Reached 0.955 / 0.963 at L0 3.4. Bricken's recipe is the ReLU + L1 SAE of `relu` with a unit
    # decoder and a median b_dec, so it should recover as well: 0.9, as `relu`.
    hyper = {"l1_coefficient": 1.0, "lr": 0.004, "dead_tokens": 20_000}
    assert min(recovery(tmp_path, "relu_2023", hyper)) > 0.9


@pytest.mark.slow
def test_gated_recovers_the_dictionary(tmp_path):
    # Reached 0.983 / 0.951 at L0 2.2. The Gated paper reports a Pareto improvement over ReLU + L1
    # (less shrinkage at the same L0), so at least ReLU + L1's level: 0.9.
    hyper = {"l1_coefficient": 2.0, "lr": 0.004, "dead_tokens": 20_000}
    assert min(recovery(tmp_path, "gated", hyper)) > 0.9


@pytest.mark.slow
def test_jumprelu_recovers_the_dictionary(tmp_path):
    # Reached 0.890 / 0.891 at L0 2.3. Jumping Ahead reports fidelity at a given L0 on par with
    # Gated and TopK, but JumpReLU has no dead-latent mechanism, and here there are exactly as many
    # latents as true directions, so each latent that dies (about 3 of 32 here) is a direction
    # lost: 0.8.
    hyper = {"l0_coefficient": 0.5, "lr": 0.008, "dead_tokens": 20_000}
    hyper |= {"bandwidth": 0.1, "init_threshold": 0.1}  # the values it was measured with
    assert min(recovery(tmp_path, "jumprelu", hyper)) > 0.8
