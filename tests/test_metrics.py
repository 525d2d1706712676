"""The measurements against their definitions, brute force and known anchors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from saedynamics.metrics import consistency
from saedynamics.metrics.consistency import (
    DENSE_BELOW,
    candidate_dtype,
    compare,
    cosine_error,
    match,
    match_dense,
    match_sparse,
    max_cosine,
    mcc,
    null_baseline,
    pw_mcc,
    shared_fraction,
    shared_latents,
    unit_rows,
)
from saedynamics.metrics.reconstruction import batch_fvu, evaluate
from saedynamics.metrics.superposition import effective_features
from saedynamics.saes import REGISTRY


def brute_force_mcc(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = a @ b.T
    n = len(a)
    return max(np.mean([cos[i, p[i]] for i in range(n)]) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_equals_exhaustive_matching(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    assert mcc(a, b) == pytest.approx(brute_force_mcc(a, b), abs=1e-12)


def test_rectangular_matching_equals_exhaustive():
    rng = np.random.default_rng(7)
    wide, narrow = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    # brute force: the best injection of the 4 narrow rows into the 6 wide ones
    a = wide / np.linalg.norm(wide, axis=1, keepdims=True)
    b = narrow / np.linalg.norm(narrow, axis=1, keepdims=True)
    best = max(
        np.mean([(a[p[j]] * b[j]).sum() for j in range(4)])
        for p in itertools.permutations(range(6), 4)
    )
    assert mcc(wide, narrow) == pytest.approx(best) and mcc(narrow, wide) == pytest.approx(best)
    partner, cos = match(wide, narrow)
    assert (partner == -1).sum() == 2 and np.isnan(cos).sum() == 2


def test_matching_recovers_a_permutation_and_uses_signed_cosine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 10))
    perm = rng.permutation(50)
    b = a[perm] * rng.uniform(0.5, 2, size=(50, 1))  # row norms do not matter
    partner, cos = match(a, b)
    assert np.array_equal(perm[partner], np.arange(50))
    assert np.allclose(cos, 1.0)
    # signed cosine: a flipped direction is anti-aligned, not a match (|cos| would give 1)
    assert mcc(np.array([[1.0, 2.0]]), np.array([[-1.0, -2.0]])) == pytest.approx(-1.0)
    assert mcc(a, -a) < 0.9
    assert max_cosine(a, b) == pytest.approx(1.0)


def assert_same_optimum(a, b, candidates=64, same_partner=False):
    """match_sparse against SciPy's dense solver; returns match_sparse's stats."""
    partner, cos, stats = match_sparse(a, b, candidates)
    dense_partner, dense_cos = match_dense(a, b)
    assert np.nanmean(cos) == pytest.approx(np.nanmean(dense_cos), abs=1e-6)
    assert np.array_equal(partner < 0, dense_partner < 0)
    assert len(set(partner[partner >= 0])) == (partner >= 0).sum()  # one-to-one
    rows = np.flatnonzero(partner >= 0)  # the cosines are the matched pairs', in float64
    assert np.allclose(cos[rows], (unit_rows(a)[rows] * unit_rows(b)[partner[rows]]).sum(1))
    if same_partner:
        assert np.array_equal(partner, dense_partner)
    return stats


def noisy_permutation(rng, n, d, noise):
    a = rng.normal(size=(n, d))
    return a, a[rng.permutation(n)] + noise * rng.normal(size=(n, d))


def test_sparse_matching_equals_dense_on_a_noisy_permutation():
    # a dictionary and a noisy permutation of it (matched cosines ~0.9), a fifth of it replaced
    # by fresh rows without a partner: a unique optimum
    rng = np.random.default_rng(10)
    a, b = noisy_permutation(rng, 1200, 32, noise=0.5)
    b[:240] = rng.normal(size=(240, 32))
    assert_same_optimum(a, b, same_partner=True)
    # above the cut-off `match` is the sparse solver
    assert len(a) >= DENSE_BELOW and np.array_equal(match(a, b)[0], match_dense(a, b)[0])


@pytest.mark.parametrize("candidates", [2, 8, 64])
def test_sparse_matching_equals_dense_on_random_dictionaries(candidates, candidate_product):
    # no structure, many near-ties: a few candidates per row miss optimal pairs
    rng = np.random.default_rng(candidates)
    a, b = rng.normal(size=(800, 8)), rng.normal(size=(800, 8))
    stats = assert_same_optimum(a, b, candidates)
    if candidates < 64:
        assert stats.added > 0 and stats.rounds > 1  # the certificate had to act


def test_sparse_matching_certificate_repairs_a_crowded_candidate_graph(candidate_product):
    # 40 rows of a all point (almost) at one row of b and keep only that candidate: the candidate
    # graph has no full matching (fallback pairs complete it) and its optimum is not the full one
    rng = np.random.default_rng(11)
    a, b = noisy_permutation(rng, 600, 64, noise=0.3)
    a[:40] = 10 * np.eye(64)[0] + rng.normal(size=(40, 64)) * 0.1
    b[0] = np.eye(64)[0]
    stats = assert_same_optimum(a, b)
    assert stats.rounds > 1 and stats.added > 0


def test_sparse_matching_rectangular_and_zero_rows():
    rng = np.random.default_rng(12)
    wide, narrow = rng.normal(size=(900, 16)), rng.normal(size=(600, 16))
    for a, b in [(wide, narrow), (narrow, wide)]:
        partner, _, _ = match_sparse(a, b)
        assert (partner < 0).sum() == len(a) - 600
        assert_same_optimum(a, b)
    # all-zero rows (cosine 0 with everything) on both sides: many exact ties
    a, b = noisy_permutation(rng, 700, 16, noise=0.5)
    a[:50], b[-80:] = 0, 0
    assert_same_optimum(a, b)
    assert_same_optimum(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cosine_error_bounds_the_candidate_product(dtype):
    # the candidates' cosines come from a low-precision product; its error bound is what keeps the
    # certificate exact. Rows with equal entries round alike: their errors add up, the worst case
    rng = np.random.default_rng(13)
    for d in (3, 8, 64, 100, 512):
        worst = 0.0
        for scale in np.linspace(0.5, 1.0, 100):
            v = np.full(d, d**-0.5)
            v[0] *= scale
            rows = torch.from_numpy(unit_rows(np.stack([v, rng.normal(size=d)])).astype(np.float32))
            product = (rows.to(dtype) @ rows.to(dtype).T).double().numpy()
            worst = max(worst, np.abs(product - unit_rows(rows) @ unit_rows(rows).T).max())
        assert worst <= cosine_error(d, dtype)
        if dtype == torch.bfloat16 and d < 512:  # 1/sqrt(d) not a power of two: nearly reached
            assert worst > 0.5 * cosine_error(d, dtype)


@pytest.fixture(params=[torch.bfloat16, torch.float32])
def candidate_product(request, monkeypatch):
    """Both candidate products the sparse matching can use, whatever this CPU picks."""
    monkeypatch.setattr(consistency, "candidate_dtype", lambda: request.param)
    return request.param


def test_candidate_dtype_is_bfloat16_only_with_bf16_instructions():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    fast = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert candidate_dtype() == (torch.bfloat16 if fast else torch.float32)


def test_sparse_matching_is_exact_where_bfloat16_cannot_tell_cosines_apart(candidate_product):
    # 600 pairs of rows of a, and of b, all four near one direction: cosines within ~2e-5 of 1,
    # which bfloat16 rounds to 1 alike. With one candidate a row keeps an arbitrary partner of its
    # block, and only the certificate (float32 rescans, exact costs) finds each block's best pairing
    rng = np.random.default_rng(14)
    centres = np.repeat(rng.normal(size=(600, 64)), 2, axis=0)
    a = centres + 0.003 * rng.normal(size=centres.shape)
    b = (centres + 0.003 * rng.normal(size=centres.shape))[rng.permutation(1200)]
    stats = assert_same_optimum(a, b, candidates=1, same_partner=True)
    assert stats.added > 50 and stats.rounds > 1


def test_candidate_bound_covers_every_pair_left_out(candidate_product):
    # the certificate's premise: a pair left out of the candidate graph has an exact cosine <=
    # bound[i]. Rows come in near-copies (two candidates each, the next cosine is the bound); a
    # low-precision product ranks near-equal cosines wrongly, so without its error bound (the
    # second check) the premise fails for many rows with bfloat16
    rng = np.random.default_rng(15)
    centres = np.repeat(rng.normal(size=(600, 64)), 2, axis=0)
    ua = unit_rows(centres + 0.003 * rng.normal(size=centres.shape))
    ub = unit_rows(centres + 0.003 * rng.normal(size=centres.shape))
    rows, cols, bound = consistency._top_candidates(ua.astype(np.float32), ub.astype(np.float32), 4)
    cos = ua @ ub.T
    cos[rows, cols] = -np.inf
    left_out_best = cos.max(axis=1)
    assert (left_out_best <= bound).all()
    if candidate_product == torch.bfloat16:
        assert (left_out_best > bound - cosine_error(64, torch.bfloat16)).sum() > 100


def test_pw_mcc_averages_all_pairs():
    rng = np.random.default_rng(1)
    decs = [torch.tensor(rng.normal(size=(5, 3))) for _ in range(4)]
    out = pw_mcc(decs)
    assert len(out["pairs"]) == 6
    values = [
        brute_force_mcc(decs[i].numpy(), decs[j].numpy())
        for i, j in itertools.combinations(range(4), 2)
    ]
    assert out["mean"] == pytest.approx(np.mean(values)) and out["std"] == pytest.approx(
        np.std(values)
    )
    with pytest.raises(ValueError):
        pw_mcc(decs[:1])


class Dictionary:
    def __init__(self, enc_rows, dec_rows):
        self.W_enc = torch.tensor(enc_rows).T
        self.W_dec = torch.tensor(dec_rows)


def test_shared_fraction_rules():
    rng = np.random.default_rng(2)
    enc, dec = rng.normal(size=(40, 64)), rng.normal(size=(40, 64))
    perm = rng.permutation(40)
    a = Dictionary(enc, dec)
    assert shared_fraction(a, Dictionary(enc[perm], dec[perm])) == 1.0
    # latent 0's decoder direction replaced by noise in b: it is no longer shared
    dec_b = dec.copy()
    dec_b[0] = rng.normal(size=64)
    assert shared_latents(a, Dictionary(enc, dec_b))[0] == np.False_
    assert shared_fraction(a, Dictionary(enc, dec_b)) == pytest.approx(39 / 40)
    # the threshold applies to both cosines: rows tilted to cosine 0.75 from their partners
    eye = np.eye(10, 64)
    tilted = 0.75 * eye + math.sqrt(1 - 0.75**2) * np.roll(eye, 10, axis=1)
    assert shared_fraction(Dictionary(eye, eye), Dictionary(tilted, eye), threshold=0.7) == 1.0
    assert shared_fraction(Dictionary(eye, eye), Dictionary(tilted, eye), threshold=0.8) == 0.0
    assert shared_fraction(Dictionary(eye, eye), Dictionary(eye, tilted), threshold=0.8) == 0.0


def test_compare_reuses_one_matching_per_matrix():
    rng = np.random.default_rng(3)
    a = Dictionary(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)))
    b = Dictionary(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)))
    out = compare(a, b, threshold=0.3)
    assert out["mcc"] == pytest.approx(mcc(a.W_dec, b.W_dec))
    assert out["encoder_mcc"] == pytest.approx(mcc(a.W_enc.T, b.W_enc.T))
    assert out["shared_fraction"] == pytest.approx(shared_fraction(a, b, threshold=0.3))
    assert out["max_cosine"] == pytest.approx(max_cosine(a.W_dec, b.W_dec))


def test_null_baseline_matches_the_spec_anchors():
    # docs/spec/measurements.md section 1.3 (numpy default_rng seed 0, mean of 2 draws)
    assert null_baseline(1024, 128, draws=2, seed=0)["pw_mcc"] == pytest.approx(0.272, abs=0.005)
    small = null_baseline(32, 16, draws=20, seed=0)
    assert small["pw_mcc"] == pytest.approx(0.460, abs=0.02)
    assert small["max_cosine"] >= small["pw_mcc"]  # no bijection: an upper bound
    assert null_baseline(256, 64, draws=1)["shared_fraction"] == 0.0


class LinearSAE(torch.nn.Module):
    """A fixed encoder/decoder pair to check the metric formulas."""

    def __init__(self, d_in=6, d_sae=10, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.d_sae = d_in, d_sae
        self.W = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g))
        self.D = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(d_in, generator=g))

    def encode(self, x):
        f = torch.relu(x @ self.W - 1.0)
        f[:, -1] = 0  # one latent never fires
        return f

    def decode(self, f):
        return f @ self.D + self.b


def test_reconstruction_metrics_against_their_definitions():
    sae = LinearSAE()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(999, 6, generator=g) * 3 + 50  # large offset: tests the stable variance
    out = evaluate(sae, torch.split(x, 128))  # uneven last batch
    X = x.double().numpy()
    with torch.no_grad():
        f = sae.encode(x).double().numpy()
        Xh = sae.decode(sae.encode(x)).double().numpy()
    err = ((X - Xh) ** 2).sum()
    fvu = err / ((X - X.mean(axis=0)) ** 2).sum()
    assert out["fvu"] == pytest.approx(fvu, rel=1e-9)
    assert out["explained_variance"] == pytest.approx(1 - fvu, rel=1e-9)
    assert out["mse"] == pytest.approx(((X - Xh) ** 2).mean(), rel=1e-9)
    cos = (X * Xh).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(Xh, axis=1)
    assert out["cossim"] == pytest.approx(cos.mean(), rel=1e-9)
    assert out["l2_ratio"] == pytest.approx(
        (np.linalg.norm(Xh, axis=1) / np.linalg.norm(X, axis=1)).mean()
    )
    assert out["l0"] == pytest.approx((f != 0).sum(1).mean())
    assert out["l1"] == pytest.approx(np.abs(f).sum(1).mean())
    density = (f != 0).mean(0)
    assert out["latent_density"] == pytest.approx(density.tolist())
    assert (
        out["dead_fraction"] == pytest.approx((density == 0).mean()) and out["dead_fraction"] >= 0.1
    )
    assert out["dense_fraction_10pct"] == pytest.approx((density > 0.1).mean())
    # these reconstructions point away from the inputs (sum <x, x_hat> < 0): no shrinkage factor
    assert (X * Xh).sum() < 0 and np.isnan(out["shrinkage_gamma"])
    assert "not positively aligned" in out["shrinkage_gamma_reason"] and out["fvu_reason"] is None
    assert out["n_tokens"] == 999
    # aligned ones: gamma is the argmin of sum |x_hat / gamma - x|^2 (searched over u = 1 / gamma)
    with torch.no_grad():
        sae.b += 50
        Xh = sae.decode(sae.encode(x)).double().numpy()
    out = evaluate(sae, torch.split(x, 128))
    u = minimize_scalar(
        lambda u: ((u * Xh - X) ** 2).sum(),
        bounds=(-10, 10),
        method="bounded",
        options={"xatol": 1e-12},
    ).x
    assert out["shrinkage_gamma"] == pytest.approx(1 / u, rel=1e-6)
    assert out["shrinkage_gamma_reason"] is None


def test_batch_fvu_is_the_same_formula():
    sae = LinearSAE()
    x = torch.randn(300, 6) * 2 + 1
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    assert batch_fvu(x.double(), x_hat.double()).item() == pytest.approx(
        evaluate(sae, [x])["fvu"], rel=1e-9
    )


def test_fvu_is_zero_for_perfect_and_one_for_mean_reconstruction():
    class Mean(LinearSAE):
        def decode(self, f):
            return torch.full((len(f), self.d_in), 2.0)

    x = torch.randn(200, 6) + 2.0
    x = x - x.mean(0) + 2.0  # exact mean 2
    assert evaluate(Mean(), [x])["fvu"] == pytest.approx(1.0, rel=1e-6)

    class Perfect(LinearSAE):
        def encode(self, x):
            return x.repeat(1, 2)[:, : self.d_sae]

        def decode(self, f):
            return f[:, : self.d_in]

    assert evaluate(Perfect(), [x])["fvu"] == pytest.approx(0.0, abs=1e-12)


def test_effective_features_on_known_entropies():
    # uniform mass over n latents: F = n; one latent: F = 1
    assert effective_features(torch.ones(7, 12), d_model=4)["effective_features"] == pytest.approx(
        12
    )
    assert effective_features(torch.ones(7, 12), d_model=4)["psi"] == pytest.approx(3)
    one = torch.zeros(5, 8)
    one[:, 3] = 2.0
    assert effective_features(one, d_model=8)["effective_features"] == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, F = 2^1.5; summed over tokens, signs ignored
    codes = torch.tensor([[2.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    out = effective_features(codes, d_model=2)
    assert out["effective_features"] == pytest.approx(2**1.5)
    assert out["entropy"] == pytest.approx(1.5 * math.log(2)) and out["alive_latents"] == 3
    # the same codes in batches: mass is summed over all tokens before the entropy
    assert effective_features(iter(torch.split(codes, 1)), 2)[
        "effective_features"
    ] == pytest.approx(2**1.5)
    # not a mean of per-token entropies
    per_token = np.mean(
        [
            math.exp(-sum(p * math.log(p) for p in (r / r.sum()) if p > 0))
            for r in codes.abs().numpy()
        ]
    )
    assert out["effective_features"] != pytest.approx(per_token)


def test_metrics_accept_registered_saes():
    cls = REGISTRY["topk"]
    sae = cls(8, 32, cls.Config(architecture="topk", k=3))
    x = torch.randn(100, 8)
    assert evaluate(sae, [x])["l0"] <= 3
    assert effective_features(sae.encode(x), 8)["alive_latents"] <= 32


class _Identity:
    def encode(self, h):
        return h

    def decode(self, f):
        return f


class _Zero:
    def encode(self, h):
        return torch.zeros_like(h)

    def decode(self, f):
        return torch.zeros_like(f)


class _Noisy(_Identity):
    def decode(self, f):
        return f + 0.5 * torch.randn(f.shape, generator=torch.Generator().manual_seed(0))


def predictive_neox():
    """A tiny GPT-NeoX that predicts its input token (unembedding = 20 x embedding), run on windows
    that repeat one token: zero-ablating a layer costs it ~5 nats, so the scores are defined."""
    from .conftest import tiny_neox

    model = tiny_neox(300, seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight * 20)
    first = torch.randint(0, 300, (6, 1), generator=torch.Generator().manual_seed(2))
    return model, first.repeat(1, 20)


@pytest.mark.parametrize("first_position", [0, 1])
def test_spliced_scores_identity_one_zero_zero(first_position):
    from saedynamics.metrics.reconstruction import spliced_scores

    model, ids = predictive_neox()
    saes = {"identity": _Identity(), "zero": _Zero(), "noisy": _Noisy()}
    out = spliced_scores(
        model, model.gpt_neox.layers[0], ids, saes, first_position, batch_sequences=4
    )
    with torch.no_grad():
        assert out["ce_orig"] == pytest.approx(
            model(input_ids=ids, labels=ids).loss.item(), rel=1e-5
        )
    identity, zero, noisy = (out["saes"][k] for k in ("identity", "zero", "noisy"))
    assert identity["ce_loss_score"] == pytest.approx(1.0) and identity[
        "kl_score"
    ] == pytest.approx(1.0)
    assert identity["kl_sae"] == pytest.approx(0.0, abs=1e-6) and identity[
        "delta_ce"
    ] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-9) and zero[
        "kl_score"
    ] == pytest.approx(0.0, abs=1e-9)
    assert out["kl_zero"] > 0 and noisy["kl_sae"] > 0  # a damaged reconstruction scores in between
    assert out["n_tokens"] == 6 * 19


def test_every_architecture_splices_into_the_model():
    """The splice hook hands SAEs [tokens, d] as in training, whatever the architecture."""
    from saedynamics.metrics.reconstruction import spliced_scores
    from saedynamics.saes import REGISTRY

    from .synthetic import k_if_any, make_sae

    model, ids = predictive_neox()
    ids = ids[:3, :12]
    saes = {}
    for name in REGISTRY:
        saes[name] = make_sae(name, 32, 64, **k_if_any(name, 4)).eval()
    out = spliced_scores(model, model.gpt_neox.layers[0], ids, saes, 1, batch_sequences=2)
    assert set(out["saes"]) == set(REGISTRY)
    assert all(np.isfinite(v["ce_loss_score"]) for v in out["saes"].values())


def test_a_ratio_is_reported_only_over_a_clearly_positive_denominator():
    from saedynamics.metrics.reconstruction import ratio_or_reason

    assert ratio_or_reason(3.0, 4.0, 0.01, "why") == (0.75, None)
    for denominator in (0.01, 0.0, -2.0):  # at the margin, zero, negative
        value, reason = ratio_or_reason(3.0, denominator, 0.01, "why")
        assert np.isnan(value) and reason == "why"


def test_spliced_scores_are_nan_with_a_reason_where_ablation_costs_nothing():
    """An LM at initialisation (LM step 0) predicts about as well zero-ablated as clean: the
    denominators are ~0 or negative, and the scores must be NaN with the reason, not numbers."""
    from saedynamics.metrics.reconstruction import ABLATION_MARGIN_NATS, spliced_scores

    from .conftest import tiny_neox

    model = tiny_neox(300, seed=1)  # random init: near-uniform predictions
    ids = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(2))
    out = spliced_scores(model, model.gpt_neox.layers[0], ids, {"identity": _Identity()}, 0, 4)
    assert out["ce_zero"] - out["ce_orig"] <= ABLATION_MARGIN_NATS  # the step-0 situation
    assert out["kl_zero"] <= ABLATION_MARGIN_NATS
    scores = out["saes"]["identity"]
    assert np.isnan(scores["ce_loss_score"]) and np.isnan(scores["kl_score"])
    assert "not above the clean loss" in scores["ce_loss_score_reason"]
    assert "nothing to recover" in scores["kl_score_reason"]
    assert np.isfinite(scores["delta_ce"])  # a difference, not a ratio: still meaningful
    model, ids = predictive_neox()
    defined = spliced_scores(model, model.gpt_neox.layers[0], ids, {"identity": _Identity()}, 0, 4)
    assert defined["saes"]["identity"]["ce_loss_score_reason"] is None


def test_compare_latent_masks_follow_the_partner():
    from saedynamics.metrics.consistency import compare

    rng = np.random.default_rng(4)
    enc, dec = rng.normal(size=(30, 64)), rng.normal(size=(30, 64))
    perm = rng.permutation(30)
    dec_b = dec[perm].copy()
    dec_b[0] = rng.normal(size=64)  # b's latent 0 (a's latent perm[0]) is replaced
    out = compare(Dictionary(enc, dec), Dictionary(enc[perm], dec_b), latents=True)
    assert out["shared_a"].sum() == out["shared_b"].sum() == 29
    assert not out["shared_a"][perm[0]] and not out["shared_b"][0]


def test_decoder_drift():
    from saedynamics.metrics.consistency import decoder_drift

    rng = np.random.default_rng(5)
    a, b, c = (rng.normal(size=(20, 8)) for _ in range(3))
    perm = rng.permutation(20)
    decoders = {
        0: {0: torch.tensor(a), 1: torch.tensor(b)},
        10: {0: torch.tensor(a[perm]), 1: torch.tensor(c)},  # seed 0 unchanged up to order
        100: {0: torch.tensor(a), 1: torch.tensor(c[perm])},
    }
    rows = {(r["step"], r["seed"]): r for r in decoder_drift(decoders)}
    assert rows[(0, 0)]["mcc_next"] == pytest.approx(1.0) and rows[(0, 0)][
        "mcc_final"
    ] == pytest.approx(1.0)
    assert rows[(0, 0)]["stable_final"] == 1.0 and rows[(100, 0)]["next_step"] is None
    assert rows[(0, 1)]["mcc_final"] == pytest.approx(mcc(b, c)) and rows[(10, 1)][
        "mcc_next"
    ] == pytest.approx(1.0)
    assert rows[(0, 0)]["mcc_final_other_seeds"] == pytest.approx(mcc(a, c[perm]))


def test_decoder_drift_counts_latents_kept_lost_and_born():
    """Hand-computed: 4 latents; seed 0's step-10 dictionary keeps latents 0 and 1 (same rows,
    reordered), rotates latent 2 away (cos 0 to anything), and latent 3 is dead at step 0 but alive
    at step 10. Alive at 0: {0, 1, 2}; at 10: all 4. Kept: 0 and 1 (matched at cos 1, alive at
    both); lost: 2 (no partner at cos >= 0.7); born: the two alive step-10 latents without a kept
    partner (latent 2's and 3's new rows)."""
    from saedynamics.metrics.consistency import decoder_drift

    eye = np.eye(6)
    before = eye[[0, 1, 2, 3]]
    after = eye[[1, 0, 4, 5]]  # latents 0, 1 kept (swapped); 2 -> e4, 3 -> e5: orthogonal
    decoders = {0: {0: torch.tensor(before)}, 10: {0: torch.tensor(after)}}
    alive = {0: {0: np.array([True, True, True, False])}, 10: {0: np.ones(4, dtype=bool)}}
    rows = {r["step"]: r for r in decoder_drift(decoders, 0.7, alive)}
    first = rows[0]
    assert (first["n_alive"], first["n_alive_next"]) == (3, 4)
    assert (first["kept_next"], first["lost_next"], first["born_next"]) == (2, 1, 2)
    assert first["n_alive"] - first["lost_next"] + first["born_next"] == first["n_alive_next"]
    assert rows[10]["n_alive"] == 4 and np.isnan(rows[10]["kept_next"])
    # a kept partner must be alive at the next step: latent 0's partner dead there -> lost
    alive[10][0] = np.array([False, True, True, True])  # after-row 0 (= e1, latent 1's) dead
    first = {r["step"]: r for r in decoder_drift(decoders, 0.7, alive)}[0]
    assert (first["n_alive_next"], first["kept_next"], first["lost_next"]) == (3, 1, 2)
    assert first["born_next"] == 2
    # without `alive`, every latent counts: kept 2, lost 2, born 2 of 4
    first = {r["step"]: r for r in decoder_drift(decoders, 0.7)}[0]
    assert (first["n_alive"], first["kept_next"], first["lost_next"], first["born_next"]) == (
        4,
        2,
        2,
        2,
    )
