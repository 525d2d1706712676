"""The toy validations of the metrics (saedynamics.toy), at small sizes.

Thresholds are loose on purpose: they check the direction of each effect with a wide margin, not the
papers' numbers (the default-size results are reported by the validation rule).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saedynamics.config import ValidationConfig
from saedynamics.metrics.superposition import effective_features
from saedynamics.toy import (
    feature_densities,
    organism_conditions,
    organism_sample,
    organism_validation,
    superposition_setting,
    superposition_validation,
    tied_sae_codes,
    tied_sae_loss,
    train_tied_saes,
    train_toy_models,
    weight_effective_features,
)

SMALL_SWEEP = ValidationConfig(  # 4000 samples in batches of 512: 8 SAE steps an epoch
    toy_models=6, toy_steps=1500, toy_samples=4000, toy_sae_epochs=190
)
SMALL_ORGANISM = ValidationConfig(
    organism_samples=8192, organism_tokens=200_000, organism_batch=512, organism_seeds=[0, 1, 2]
)
TINY_ORGANISM = ValidationConfig(
    organism_samples=4096, organism_tokens=20_480, organism_batch=512, organism_seeds=[0, 1, 2]
)


# ---- effective features ---------------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation (as toy.py does)
    yield
    torch.set_num_threads(threads)


def test_toy_models_dense_represent_n_features_sparse_more(one_thread):
    # Elhage et al.: dense features -> the N most important get orthogonal directions (F = N);
    # sparse features -> more than N features share the N dimensions (superposition).
    cfg = ValidationConfig(toy_models=3, toy_min_density=0.001, toy_steps=2000)
    w, _ = train_toy_models(cfg, torch.Generator().manual_seed(0))
    n = cfg.toy_hidden
    f_sparse, _, f_dense = (weight_effective_features(w[i]) for i in range(3))
    assert abs(f_dense - n) < 1.0, f_dense
    assert f_sparse > 1.5 * n, f_sparse


def test_effective_features_of_a_known_configuration():
    # Three orthonormal feature directions in N = 4 dimensions, two features unrepresented.
    n = 4
    w = torch.zeros(n, 5)
    w[0, 0] = w[1, 1] = w[2, 2] = 1.0
    assert weight_effective_features(w) == pytest.approx(3.0)
    # the ideal tied SAE (E = W^T, no bias) turns one-hot features into one-hot codes
    f = torch.eye(5)[[0, 1, 2, 0, 1, 2]]  # every represented feature twice, one at a time
    h = f @ w.T
    z = tied_sae_codes(h[None], w.T[None], torch.zeros(1, 5))[0]
    assert torch.equal(z, f)
    assert effective_features(z, d_model=n)["effective_features"] == pytest.approx(3.0)
    # unequal weights: |W_:,i|^2 = 1, 1, 4 -> p = (1, 1, 4) / 6
    w[2, 2] = 2.0
    p = np.array([1, 1, 4]) / 6
    assert weight_effective_features(w) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # |W_:,i| = 1, 1, 2 -> p = (1, 1, 2) / 4: F = exp(1.5 ln 2)
    assert weight_effective_features(w, power=1.0) == pytest.approx(2**1.5)
    # one-hot codes used 2:1:1 -> p = (1/2, 1/4, 1/4): F = 2^1.5
    codes = torch.eye(3)[[0, 0, 1, 2]]
    assert effective_features(codes, d_model=n)["effective_features"] == pytest.approx(2**1.5)


def test_sae_effective_features_track_ground_truth():
    result = superposition_validation(SMALL_SWEEP)
    assert len(result["models"]) == SMALL_SWEEP.toy_models
    densities = [m["density"] for m in result["models"]]
    assert densities[0] == pytest.approx(SMALL_SWEEP.toy_min_density)
    assert densities[-1] == pytest.approx(SMALL_SWEEP.toy_max_density)
    for m in result["models"]:
        assert {"density", "f_true", "f_sae", "psi_frob"} <= set(m)
        assert 1.0 <= m["f_true"] <= SMALL_SWEEP.toy_features
        assert 1.0 <= m["f_sae"] <= SMALL_SWEEP.toy_sae_expansion * SMALL_SWEEP.toy_hidden
    assert result["pearson_r"] > 0.5, result["pearson_r"]
    assert result["pearson_r_psi_frob"] > 0.9  # psi_Frob and F_true both read the toy weights
    assert result["settings"]["toy_models"] == SMALL_SWEEP.toy_models
    json.dumps(result, allow_nan=False)


def test_superposition_json_states_r_and_its_setting():
    cfg = ValidationConfig(toy_models=3, toy_steps=20, toy_samples=300, toy_sae_epochs=3)
    result = superposition_validation(cfg)
    assert result["pearson_r"] is None or -1.0 <= result["pearson_r"] <= 1.0
    settings = result["settings"]
    for key in ValidationConfig.paper_superposition_settings():
        assert settings[key] == getattr(cfg, key), key  # every toy setting that matters
    assert settings["seed"] == cfg.seed and settings["sae_latents"] == 40
    assert result["paper_setting"] is False
    differs = result["differs_from_paper"]
    assert differs["toy_models"] == {"paper": 100, "ours": 3}
    assert differs["toy_sae_batch"] == {"paper": 128, "ours": 512}
    assert "toy_hidden" not in differs and "toy_sae_l1" not in differs
    assert [m["sae_epochs"] for m in result["models"]] == [3, 3, 3]
    json.dumps(result, allow_nan=False)


def test_an_sae_without_an_active_latent_has_no_f():
    """A strong l1 silences every latent: F of its codes is undefined, so f_sae is null with a
    reason, r is over the models that have one (here none), and the JSON is valid."""
    cfg = ValidationConfig(toy_models=3, toy_steps=20, toy_samples=300, toy_sae_epochs=20)
    cfg = cfg.model_copy(update={"toy_sae_batch": 64, "toy_sae_lr": 0.05, "toy_sae_l1": 100.0})
    result = superposition_validation(cfg)
    for m in result["models"]:
        assert (m["f_sae"], m["f_sae_reason"], m["sae_alive_latents"]) == (
            None,
            "no active latent",
            0,
        )
    assert result["pearson_r"] is None and result["pearson_r_models"] == 0
    json.dumps(result, allow_nan=False)


def test_paper_setting_is_recognised():
    paper = ValidationConfig.paper_superposition()
    assert superposition_setting(paper) == {"paper_setting": True, "differs_from_paper": {}}
    assert (paper.toy_models, paper.toy_features, paper.toy_hidden) == (100, 20, 5)
    assert (paper.toy_sae_batch, paper.toy_sae_epochs, paper.toy_sae_patience) == (128, 800, 10)
    densities = feature_densities(paper)  # S in [0.001, 0.999]
    assert densities[0] == pytest.approx(0.001) and densities[-1] == pytest.approx(0.999)
    reduced = superposition_setting(ValidationConfig.paper_superposition(toy_steps=10))
    assert reduced["differs_from_paper"] == {"toy_steps": {"paper": 10_000, "ours": 10}}
    with pytest.raises(ValueError):
        ValidationConfig(toy_min_density=0.5, toy_max_density=0.1)


def test_early_stopping_keeps_each_sae_where_it_stopped(one_thread):
    # The SAEs that stop leave the batch; the others go on exactly as if trained alone, so an SAE
    # that stopped after E epochs equals one trained for E epochs without early stopping.
    h = torch.rand(4, 300, 5, generator=torch.Generator().manual_seed(0))
    h = h * torch.tensor([0.1, 0.5, 2.0, 4.0])[:, None, None]
    cfg = ValidationConfig(toy_sae_batch=64, toy_sae_epochs=60, toy_sae_patience=1, toy_sae_lr=3e-3)
    e, b, epochs = train_tied_saes(h, cfg, torch.Generator().manual_seed(1))
    assert epochs.min() < 60  # some stopped early
    for i, n in enumerate(epochs.tolist()):
        short = cfg.model_copy(update={"toy_sae_epochs": n, "toy_sae_patience": 0})
        e_i, b_i, _ = train_tied_saes(h, short, torch.Generator().manual_seed(1))
        assert torch.equal(e_i[i], e[i]) and torch.equal(b_i[i], b[i]), i


def test_tied_sae_loss_of_a_hand_computed_batch():
    """Eq. 5 of the paper (sums per sample, mean over the batch) and the authors' code (means over
    every element), on 2 samples in N = 2 with D = 3 latents. Sample 1: z = ReLU(E x + b) =
    ReLU(1, 2 - 1, 3 - 4) = (1, 1, 0), x' = (1, 1), error (0, 1); sample 2 is zero."""
    x = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[0.0, -1.0, -4.0]])
    # eq. 5: (|error|^2 + 0.1 |z|_1) = (1 + 0.2, 0) per sample, mean 0.6
    assert tied_sae_loss(x, e, b, 0.1, "eq5").item() == pytest.approx(0.6)
    # code: error^2 over 4 elements 1 / 4, |z| over 6 elements 2 / 6
    assert tied_sae_loss(x, e, b, 0.1, "code").item() == pytest.approx(0.25 + 0.1 * 2 / 6)


def test_f_true_of_a_hand_computed_toy_model():
    # W [N = 2, M = 3]: column norms 3, 4 and 0 (an unrepresented feature)
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    p = np.array([9, 16]) / 25  # p_i ~ |W_:,i|^2
    assert weight_effective_features(w) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    q = np.array([3, 4]) / 7  # p_i ~ |W_:,i|
    assert weight_effective_features(w, power=1.0) == pytest.approx(
        math.exp(-(q * np.log(q)).sum())
    )


def test_superposition_validation_is_deterministic():
    cfg = ValidationConfig(toy_models=3, toy_steps=50, toy_samples=500, toy_sae_epochs=50, seed=3)
    threads = torch.get_num_threads()

    def run(c):
        result = superposition_validation(c)
        del result["wall_seconds"]  # the one field that may differ
        return result

    a = run(cfg)
    assert torch.get_num_threads() == threads  # restored
    assert run(cfg) == a
    assert run(cfg.model_copy(update={"seed": 4})) != a


# ---- the model organism ---------------------------------------------------------------------------


def test_organism_sample():
    a_true, codes = organism_sample(n=1000, d=16, m=32, k=3, seed=0)
    assert a_true.shape == (32, 16) and codes.shape == (1000, 32)
    assert np.allclose(np.linalg.norm(a_true, axis=1), 1.0)
    assert ((codes != 0).sum(axis=1) == 3).all() and (codes >= 0).all()
    again, _ = organism_sample(n=1000, d=16, m=32, k=3, seed=0)
    assert np.array_equal(a_true, again)


def test_organism_conditions():
    conditions = organism_conditions(ValidationConfig())
    assert set(conditions) == {"topk_matched", "topk_mismatched", "relu_matched", "relu_mismatched"}
    assert conditions["topk_matched"].k == 3 and conditions["topk_mismatched"].k == 6
    relu, dense = conditions["relu_matched"], conditions["relu_mismatched"]
    assert dense.l1_coefficient == pytest.approx(relu.l1_coefficient / 10)


def test_matched_topk_recovers_the_dictionary(tmp_path):
    # Song et al.: TopK at the true k recovers A_true; PW-MCC follows. Measured here (200k tokens):
    # GT-MCC 0.90-0.92, PW-MCC 0.87; random dictionaries of this shape: 0.46.
    result = organism_validation(SMALL_ORGANISM, tmp_path, conditions=["topk_matched"])
    cond = result["conditions"]["topk_matched"]
    final = cond["final"]
    assert final["gt_mcc"] > 0.85, final
    assert min(final["gt_mcc_seed"].values()) > 0.8, final
    assert final["pw_mcc"] > result["null_pw_mcc"] + 0.3, final
    assert final["l0"] == pytest.approx(SMALL_ORGANISM.organism_k, abs=0.01)
    # PW-MCC rises with ground-truth recovery over training
    assert cond["pearson_r"] > 0.8
    assert cond["curve"]["pw_mcc"][-1] > cond["curve"]["pw_mcc"][0] + 0.2
    # the SAEs and nothing else: the samples are held in memory, not written
    assert [p.name for p in tmp_path.iterdir()] == ["topk_matched"]
    assert sorted(p.name for p in (tmp_path / "topk_matched").iterdir()) == [
        "seed0",
        "seed1",
        "seed2",
    ]


def test_organism_result_structure(tmp_path):
    result = organism_validation(TINY_ORGANISM, tmp_path)
    names = ["topk_matched", "topk_mismatched", "relu_matched", "relu_mismatched"]
    assert list(result["conditions"]) == names
    seeds = [str(s) for s in TINY_ORGANISM.organism_seeds]
    n_steps = TINY_ORGANISM.organism_tokens // TINY_ORGANISM.organism_batch
    for name in names:
        cond = result["conditions"][name]
        curve = cond["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == n_steps - 1
        n_points = len(curve["step"])
        for key in ("tokens", "pw_mcc", "pw_mcc_std", "gt_mcc", "l0"):
            assert len(curve[key]) == n_points, key
        assert sorted(curve["gt_mcc_seed"]) == seeds
        assert all(len(v) == n_points for v in curve["gt_mcc_seed"].values())
        # the mean over seeds of the per-seed curves is the reported mean
        per_seed = np.array([curve["gt_mcc_seed"][s] for s in seeds])
        assert np.allclose(per_seed.mean(axis=0), curve["gt_mcc"])
        final = cond["final"]
        assert final["pw_mcc"] == curve["pw_mcc"][-1] and final["gt_mcc"] == curve["gt_mcc"][-1]
        # PW-MCC over all seed pairs
        pairs = {(p["seed_a"], p["seed_b"]) for p in final["pw_mcc_pairs"]}
        assert pairs == {(0, 1), (0, 2), (1, 2)}
        assert final["pw_mcc"] == pytest.approx(np.mean([p["mcc"] for p in final["pw_mcc_pairs"]]))
        assert -1.0 <= cond["pearson_r"] <= 1.0
        assert cond["architecture"] in ("topk", "relu")
    ordering = result["ordering"]
    assert sorted(ordering["by_gt_mcc"]) == sorted(names) == sorted(ordering["by_pw_mcc"])
    assert isinstance(ordering["same_order"], bool)
    assert -1.0 <= ordering["spearman_rho"] <= 1.0 and -1.0 <= ordering["pooled_pearson_r"] <= 1.0
    assert result["null_pw_mcc"] == pytest.approx(0.46, abs=0.02)  # spec section 1.3
    assert result["settings"]["training"]["seeds"] == TINY_ORGANISM.organism_seeds
    json.dumps(result, allow_nan=False)
    # every condition and seed trained in one set, from one stream of batches
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        for s in TINY_ORGANISM.organism_seeds:
            record = json.loads((tmp_path / name / f"seed{s}" / "cfg.json").read_text())
            assert record["saedynamics"]["trained_with"] == sorted(names)
            assert record["saedynamics"]["seed"] == s


def test_organism_validation_is_deterministic(tmp_path):
    run = lambda d: organism_validation(TINY_ORGANISM, tmp_path / d, conditions=["relu_matched"])  # noqa: E731
    assert run("a") == run("b")


def test_unknown_organism_condition(tmp_path):
    with pytest.raises(ValueError, match="unknown organism conditions"):
        organism_validation(TINY_ORGANISM, tmp_path, conditions=["gated"])
