"""Toy models with known ground truth: do the metrics measure what they claim?

The workflow reports two kinds of numbers on language-model SAEs, whose true values nobody knows:
how many features a layer carries (effective features F, `metrics.superposition`) and whether SAEs
trained with different seeds find the same dictionary (PW-MCC, `metrics.consistency`). Here both
are computed, with the same code, on toy data whose answer is known, as the papers that proposed
them did. Each experiment returns plain JSON-able data; nothing here plots or writes results.

1. `superposition_validation`: effective features against toy models of superposition.
   Source: Bereska, Tzifa-Kratira, Samavi, Gavves 2025, "Superposition as Lossy Compression",
   section 5.1 (spec/measurements.md section 2, "Toy validation"), on the toy models of Elhage et
   al. 2022, "Toy Models of Superposition".
   - Toy models: M = toy_features features f_i, each Uniform[0, 1] with probability 1 - S (the
     density) and 0 otherwise, independently; x = W f with W [N, M] (N = toy_hidden), read out as
     f' = ReLU(W^T x + b); trained to minimise sum_i I_i (f_i - f'_i)^2 with importance
     I_i = toy_importance_decay^i (mean over samples and features, Elhage et al.'s reduction).
     `toy_models` densities, log-spaced from toy_min_density to 1, sweep the models from no
     superposition (dense features: the N most important features get N orthogonal directions)
     to strong superposition (sparse features: more than N directions packed into N dimensions).
     Training as Elhage et al.: Xavier-normal W, b = 0, Adam, fresh samples every step; our step
     budget is smaller (toy_steps = 3000 vs their 10,000), so we use lr 3e-3 (theirs 1e-3) with
     batches of 256 (theirs 1024): the trained models span F_true from N to about 3N, which is
     all the validation needs, since the ground truth is read off each trained model itself.
   - Ground truth: F_true = exp(H(p)), p_i proportional to |W_:,i|^2, the share of feature i in
     the model's squared weight norm. How the toy weights enter the entropy is not stated in the
     paper text we checked; p_i proportional to |W_:,i|^2 is the spec's choice. The alternative
     p_i proportional to |W_:,i| (what an SAE that recovers the toy features exactly would give,
     since its code for feature i is f_i |W_:,i|) is reported alongside as `f_true_norm`, and
     psi_Frob = |W|_F^2 / N, the paper's weight-based reference (about the number of represented
     features over N), as `psi_frob`.
   - Measured: on toy_samples hidden activations h = W f of each model, the paper's SAE
     (`TiedSparseAutoencoder` of superposition-measurement): tied weights, z = ReLU(E h + b_e),
     h_hat = E^T z (no decoder bias), toy_sae_expansion * N latents, Xavier-uniform E, b_e = 0,
     loss = mean (h - h_hat)^2 + toy_sae_l1 * mean |z| (both means over all elements), Adam lr 1e-3
     as in the paper. The paper trains with batches of 128 for up to 800 epochs with early
     stopping; we train toy_sae_steps steps on batches of 512 drawn with replacement from the
     toy_samples activations (3000 steps: about 150 epochs). F_SAE = `effective_features` of the
     codes z over all toy_samples activations (the workflow's one implementation of F; F_true goes
     through the same function, with the weight shares as a single "token").
   - Reported: per model the density, F_true, F_SAE, psi_Frob; the Pearson r of F_SAE against
     F_true across the sweep (the paper: r = 0.94 +- 0.02 through the SAE, 0.99 +- 0.01 on the
     toy weights themselves). For reading, also per model: the features with |W_:,i| > 0.5
     (`represented_features`), the SAE's latents with any activation mass and its fraction of
     variance unexplained. Measured at the defaults: r = 0.90 (0.89 +- 0.02 over seeds 0-4),
     r(psi_Frob, F_true) = 0.99; F_SAE scatters most at the lowest densities, where the
     toy_samples activations hold only about ten occurrences of each feature.
   All models, and then all SAEs, are trained at once as one batched tensor program: Adam's update
   is elementwise, so this is exactly training each separately.

2. `organism_validation`: PW-MCC against ground-truth recovery on a model organism.
   Source: Song, Muhamed et al. 2025 (arXiv 2505.20254), the synthetic model organism
   (spec/measurements.md section 1.4; repository sae-feature-consistency, `synthetic/`).
   - Data: a dictionary A_true of m = organism_latents unit rows (i.i.d. Gaussian, normalised) in
     n = organism_dims dimensions; every sample has exactly k = organism_k active latents, chosen
     uniformly, with values |N(0, 1)|; x = s A_true. The real trainer (`training.train_saes`)
     trains every condition and seed on the organism_samples samples, held in memory
     (`sources.TensorSource`), from one stream of batches, as a train job of the workflow does.
   - Conditions, each over organism_seeds (init seeds), d_sae = m as in the paper:
       topk_matched      TopK at the true k
       topk_mismatched   TopK at 2k
       relu_matched      ReLU + L1 (the registered `relu`), lambda = 1.0: L0 near k at the
                         defaults (measured L0 about 3.5 for k = 3; reported as `final.l0`)
       relu_mismatched   the same with lambda 10x smaller: dense codes (L0 about 15)
     lambda is a constant, not calibrated per run: with other organism sizes check `final.l0`.
   - Training choices for organism_tokens (defaults 1M tokens, about 1000 steps of 1024, where the
     paper ran 30,000 full-batch steps at lr 1e-4): Adam lr 1e-2 for every condition (the
     architectures' defaults are set for LLM widths and far longer runs: TopK's rule gives 4.5e-3
     at d_sae = 32, ReLU's 5e-5); input_scaling "centred" (E|x - E x|^2 = n, so lambda means the
     same for any n); dead_tokens = 2% of organism_tokens, the fraction that Song et al.'s 10M of
     500M tokens is (AuxK then revives TopK latents within the run); the trainer's defaults
     otherwise (lr warm-up 1%, linear decay over the last 20%, gradient clipping at norm 1, the
     first 16,384 tokens as the init sample); on the CPU; a curve point every max(1, steps // 100)
     steps.
   - Measured, at every curve point through the trainer's `observe` hook on the live SAEs: each
     seed's ground-truth-recovery MCC, `mcc(W_dec, A_true)` (Hungarian-matched mean cosine of the
     decoder rows to A_true's), the PW-MCC across seeds (`pw_mcc`, all seed pairs), and each
     seed's L0 on the first 4096 samples.
   - Reported, per condition: the curves, the final values, and how PW-MCC tracks ground-truth
     recovery (Pearson r of PW-MCC and mean GT-MCC over the curve); across conditions, whether
     PW-MCC orders the conditions as GT-MCC does (both orders, Spearman's rho, and the Pearson r
     over all curve points of all conditions); and the PW-MCC of random dictionaries of the same
     shape (`null_baseline`; 0.46 for 32 x 16). The paper: PW-MCC tracks GT-MCC; TopK at the true
     k reaches near 1, L1 lags. Measured at the defaults (seed 0): final PW-MCC / GT-MCC
     0.87 / 0.92 (TopK matched), 0.81 / 0.82 (TopK 2k), 0.95 / 0.97 (ReLU matched), 0.78 / 0.74
     (ReLU dense); r over the curve 0.87-0.99 (0.95 pooled); PW-MCC orders the conditions as
     GT-MCC does. Our
     ReLU + L1 (decoder-norm-weighted penalty, Anthropic's April-2024 recipe) does not lag TopK
     here; the paper's L1 SAEs were the older `standard` ones.

Reproducibility: everything is seeded from `cfg.seed` (toy models and their data, the SAEs' init
and batches, the organism's dictionary and samples, the trainer's data order); the organism SAEs'
init seeds are organism_seeds. Both experiments run on the CPU with one torch thread (restored
afterwards): at these sizes more threads only add synchronisation, and the results are then
bit-identical whatever the caller's thread count. Wall time at the defaults on a shared 2-core
machine: 14 s for the superposition sweep, 19 s for the organism (both logged).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from saedynamics.config import TrainingConfig, ValidationConfig
from saedynamics.metrics.consistency import mcc, null_baseline, pw_mcc
from saedynamics.metrics.superposition import effective_features
from saedynamics.saes import REGISTRY, SAE, ArchitectureConfig
from saedynamics.scaling import input_scale
from saedynamics.sources import TensorSource
from saedynamics.training import train_saes

log = logging.getLogger(__name__)

# ---- settings that are not in ValidationConfig (see the module docstring for why) ---------------

TOY_LR = 3e-3  # Elhage et al.: 1e-3 over 10,000 steps; we train toy_steps = 3000
TOY_BATCH = 256  # Elhage et al.: 1024
SAE_LR = 1e-3  # Bereska et al.'s TiedSparseAutoencoder
SAE_BATCH = 512  # Bereska et al.: 128, for up to 800 epochs
ORGANISM_LR = 1e-2
ORGANISM_L1 = 1.0  # ReLU + L1 lambda giving L0 near k = 3 at the defaults
ORGANISM_DEAD_FRACTION = 0.02  # dead_tokens / organism_tokens (Song et al.: 10M of 500M)
ORGANISM_CURVE_POINTS = 100
ORGANISM_EVAL_SAMPLES = 4096  # samples on which L0 is measured

REFERENCE = {  # what the papers report, for comparison (not pass/fail thresholds)
    "superposition": {"pearson_r_sae": 0.94, "pearson_r_sae_std": 0.02, "pearson_r_weights": 0.99},
    "organism": {"random_pw_mcc_32x16": 0.46},
}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stream(seed: int, name: str) -> int:
    """An independent RNG seed for one named random stream of an experiment seeded with `seed`."""
    key = [seed, *name.encode()]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def _pearson(a, b) -> float | None:
    """Pearson r, or None where it is undefined (< 3 points, a constant series, a NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ==== 1. effective features on toy models of superposition =========================================


def feature_densities(cfg: ValidationConfig) -> np.ndarray:
    """1 - S of each toy model: log-spaced from toy_min_density to 1."""
    return np.logspace(math.log10(cfg.toy_min_density), 0.0, cfg.toy_models)


def sample_features(
    density: Tensor, batch: int, n_features: int, generator: torch.Generator
) -> Tensor:
    """Features [models, batch, M]: Uniform[0, 1] with probability density[model], else 0.

    One uniform draw u per entry: active iff u < p, and then u / p is Uniform[0, 1].
    """
    u = torch.rand(len(density), batch, n_features, generator=generator)
    p = density[:, None, None].float()
    return torch.where(u < p, u / p, 0.0)


def train_toy_models(cfg: ValidationConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Elhage et al.'s ReLU-output toy models, one per density: (W [models, N, M], b [models, M])."""
    k, n, m = cfg.toy_models, cfg.toy_hidden, cfg.toy_features
    density = torch.tensor(feature_densities(cfg))
    importance = cfg.toy_importance_decay ** torch.arange(m, dtype=torch.float32)
    w = torch.randn(k, n, m, generator=generator) * math.sqrt(2.0 / (n + m))  # Xavier normal
    w.requires_grad_(True)
    b = torch.zeros(k, m, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=TOY_LR)
    for _ in range(cfg.toy_steps):
        f = sample_features(density, TOY_BATCH, m, generator)
        out = torch.relu(torch.bmm(torch.bmm(f, w.transpose(1, 2)), w) + b[:, None, :])
        loss = (importance * (f - out).pow(2)).mean(dim=(1, 2)).sum()  # independent per model
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def weight_effective_features(w: Tensor, power: float = 2.0) -> float:
    """F of a toy model's weights W [N, M]: exp(H(p)) with p_i proportional to |W_:,i|^power.

    Computed by `effective_features` with the weight shares as one "token" of codes, so that the
    ground truth and the measurement share one implementation of the entropy.
    """
    shares = w.double().norm(dim=0).pow(power)[None, :]
    return effective_features(shares, d_model=w.shape[0])["effective_features"]


def train_tied_saes(
    h: Tensor, cfg: ValidationConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Bereska et al.'s tied ReLU SAE on each model's activations h [models, samples, N].

    Returns (E [models, D, N], b_e [models, D]); codes z = ReLU(E h + b_e), h_hat = E^T z.
    """
    k, n_samples, n = h.shape
    d = cfg.toy_sae_expansion * n
    bound = math.sqrt(6.0 / (d + n))  # Xavier uniform of nn.Linear(N, D).weight
    e = (torch.rand(k, d, n, generator=generator) * 2 - 1) * bound
    e.requires_grad_(True)
    b = torch.zeros(k, d, requires_grad=True)
    opt = torch.optim.Adam([e, b], lr=SAE_LR)
    for _ in range(cfg.toy_sae_steps):
        x = h[:, torch.randint(n_samples, (SAE_BATCH,), generator=generator)]
        z = tied_sae_codes(x, e, b)
        mse = (x - torch.bmm(z, e)).pow(2).mean(dim=(1, 2))
        loss = (mse + cfg.toy_sae_l1 * z.abs().mean(dim=(1, 2))).sum()  # independent per model
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return e.detach(), b.detach()


def tied_sae_codes(h: Tensor, e: Tensor, b: Tensor) -> Tensor:
    """z = ReLU(E h + b_e) for every model: h [models, samples, N] -> z [models, samples, D]."""
    return torch.relu(torch.bmm(h, e.transpose(1, 2)) + b[:, None, :])


def superposition_validation(cfg: ValidationConfig) -> dict:
    """Effective features measured through an SAE against the toy models' known F (see above)."""
    started = time.perf_counter()
    with _one_thread(), torch.no_grad():
        toy_gen = torch.Generator().manual_seed(_stream(cfg.seed, "toy models"))
        sae_gen = torch.Generator().manual_seed(_stream(cfg.seed, "toy saes"))
        with torch.enable_grad():
            w, _ = train_toy_models(cfg, toy_gen)
        density = torch.tensor(feature_densities(cfg))
        f = sample_features(density, cfg.toy_samples, cfg.toy_features, toy_gen)
        h = torch.bmm(f, w.transpose(1, 2))  # hidden activations [models, samples, N]
        with torch.enable_grad():
            e, b = train_tied_saes(h, cfg, sae_gen)
        z = tied_sae_codes(h, e, b)
        h_hat = torch.bmm(z, e)
        fvu = (h - h_hat).pow(2).sum(dim=(1, 2)) / (h - h.mean(dim=1, keepdim=True)).pow(2).sum(
            dim=(1, 2)
        ).clamp_min(1e-30)

        n = cfg.toy_hidden
        models = []
        for i, p in enumerate(feature_densities(cfg)):
            measured = effective_features(z[i], d_model=n)
            norms = w[i].norm(dim=0)
            models.append(
                {
                    "density": float(p),
                    "sparsity": float(1.0 - p),
                    "f_true": weight_effective_features(w[i], power=2.0),
                    "f_true_norm": weight_effective_features(w[i], power=1.0),
                    "f_sae": measured["effective_features"],
                    "psi_frob": float(w[i].double().pow(2).sum() / n),
                    "represented_features": int((norms > 0.5).sum()),
                    "sae_alive_latents": measured["alive_latents"],
                    "sae_fvu": float(fvu[i]),
                }
            )
    f_true = [row["f_true"] for row in models]
    f_sae = [row["f_sae"] for row in models]
    result = {
        "experiment": "superposition",
        "source": "Bereska et al. 2025 section 5.1 on Elhage et al. 2022 toy models",
        "models": models,
        "pearson_r": _pearson(f_sae, f_true),
        "pearson_r_norm": _pearson(f_sae, [row["f_true_norm"] for row in models]),
        "pearson_r_psi_frob": _pearson([row["psi_frob"] for row in models], f_true),
        "reference": REFERENCE["superposition"],
        "settings": {
            **{k: v for k, v in cfg.model_dump(mode="json").items() if k.startswith("toy_")},
            "seed": cfg.seed,
            "toy_lr": TOY_LR,
            "toy_batch": TOY_BATCH,
            "sae_lr": SAE_LR,
            "sae_batch": SAE_BATCH,
            "sae_latents": cfg.toy_sae_expansion * n,
            "f_true": "exp(H(p)), p_i ~ |W_:,i|^2",
        },
    }
    log.info(
        "superposition validation: %d toy models, r(F_SAE, F_true) = %s, in %.1f s",
        cfg.toy_models,
        "n/a" if result["pearson_r"] is None else f"{result['pearson_r']:.3f}",
        time.perf_counter() - started,
    )
    return result


# ==== 2. PW-MCC on the model organism ===============================================================


def organism_sample(
    n: int, d: int, m: int, k: int, seed: int | np.random.Generator = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The organism's A_true [m, d] (unit rows) and codes [n, m] (exactly k active, |N(0, 1)|).

    `seed` may be a numpy Generator, which is then advanced (callers draw more from it).
    """
    rng = np.random.default_rng(seed)
    a_true = rng.standard_normal((m, d))
    a_true /= np.linalg.norm(a_true, axis=1, keepdims=True)
    codes = np.zeros((n, m))
    active = np.argsort(rng.random((n, m)), axis=1)[:, :k]
    np.put_along_axis(codes, active, np.abs(rng.standard_normal((n, k))), axis=1)
    return a_true, codes


def organism_conditions(cfg: ValidationConfig) -> dict[str, ArchitectureConfig]:
    """The four conditions: TopK and ReLU + L1, each at a matched and a mismatched sparsity."""
    k = cfg.organism_k
    common = {
        "lr": ORGANISM_LR,
        "dead_tokens": max(1, round(ORGANISM_DEAD_FRACTION * cfg.organism_tokens)),
    }
    topk, relu = REGISTRY["topk"].Config, REGISTRY["relu"].Config
    return {
        "topk_matched": topk(architecture="topk", k=k, **common),
        "topk_mismatched": topk(architecture="topk", k=2 * k, **common),
        "relu_matched": relu(architecture="relu", l1_coefficient=ORGANISM_L1, **common),
        "relu_mismatched": relu(architecture="relu", l1_coefficient=ORGANISM_L1 / 10, **common),
    }


def organism_training(cfg: ValidationConfig) -> TrainingConfig:
    """The trainer's settings for every condition (see the module docstring)."""
    n_steps = max(1, cfg.organism_tokens // cfg.organism_batch)
    return TrainingConfig(
        n_latents=cfg.organism_latents,
        seeds=list(cfg.organism_seeds),
        data_seed=_stream(cfg.seed, "organism data order"),
        train_tokens=cfg.organism_tokens,
        batch_size=cfg.organism_batch,
        init_tokens=min(16384, cfg.organism_samples),
        input_scaling="centred",
        log_every=max(1, n_steps // ORGANISM_CURVE_POINTS),
        device="cpu",
    )


class _Recorder:
    """The `observe` callback: GT-MCC per seed, PW-MCC and L0 at every curve point."""

    def __init__(self, a_true: np.ndarray, x_eval: Tensor, seeds: list[int], batch: int):
        self.a_true, self.x_eval, self.seeds, self.batch = a_true, x_eval, seeds, batch
        self.curve: dict[str, list] = {
            "step": [],
            "tokens": [],
            "pw_mcc": [],
            "pw_mcc_std": [],
            "gt_mcc": [],
            "gt_mcc_seed": {str(s): [] for s in seeds},
            "l0": [],
            "l0_seed": {str(s): [] for s in seeds},
        }
        self.pairs: list[dict] = []

    def __call__(self, step: int, saes: dict[int, SAE]) -> None:
        decoders = [saes[s].W_dec for s in self.seeds]
        gt = [mcc(dec, self.a_true) for dec in decoders]
        pw = pw_mcc(decoders)
        l0 = [
            float((saes[s].encode(self.x_eval) != 0).sum(dim=1).double().mean()) for s in self.seeds
        ]
        c = self.curve
        c["step"].append(step)
        c["tokens"].append((step + 1) * self.batch)
        c["pw_mcc"].append(pw["mean"])
        c["pw_mcc_std"].append(pw["std"])
        c["gt_mcc"].append(float(np.mean(gt)))
        c["l0"].append(float(np.mean(l0)))
        for s, g, n in zip(self.seeds, gt, l0, strict=True):
            c["gt_mcc_seed"][str(s)].append(g)
            c["l0_seed"][str(s)].append(n)
        self.pairs = [
            {"seed_a": self.seeds[p["a"]], "seed_b": self.seeds[p["b"]], "mcc": p["mcc"]}
            for p in pw["pairs"]
        ]


def organism_validation(
    cfg: ValidationConfig, work_dir: Path, conditions: list[str] | None = None
) -> dict:
    """PW-MCC against ground-truth recovery on the model organism (see the module docstring).

    Writes work_dir/<condition>/seed<s>/ (the trained SAEs).
    `conditions`: a subset of `organism_conditions(cfg)` to run (default: all four).
    """
    started = time.perf_counter()
    work_dir = Path(work_dir)
    all_conditions = organism_conditions(cfg)
    names = list(all_conditions) if conditions is None else list(conditions)
    unknown = [c for c in names if c not in all_conditions]
    if unknown:
        raise ValueError(f"unknown organism conditions {unknown}; known: {list(all_conditions)}")
    training = organism_training(cfg)
    seeds = list(cfg.organism_seeds)

    a_true, codes = organism_sample(
        cfg.organism_samples,
        cfg.organism_dims,
        cfg.organism_latents,
        cfg.organism_k,
        seed=_stream(cfg.seed, "organism"),
    )
    source = TensorSource({"act": torch.from_numpy(codes @ a_true).float()}, {"model": "organism"})
    scale = input_scale(source.norm, training.input_scaling, source.d_model)
    x_eval = source.tensors["act"][:ORGANISM_EVAL_SAMPLES] * scale
    recorders = {name: _Recorder(a_true, x_eval, seeds, training.batch_size) for name in names}

    def observe(step: int, saes: dict[str, dict[int, SAE]]) -> None:
        for name, recorder in recorders.items():
            recorder(step, saes[name])

    with _one_thread():  # every condition from one stream of batches, as a train job does
        train_saes(
            training,
            {name: all_conditions[name] for name in names},
            source,
            work_dir,
            {"study": "validation", "step": 0, "layer": 0},
            {"experiment": "organism"},
            observe=observe,
        )
    results = {}
    for name in names:
        arch, c = all_conditions[name], recorders[name].curve
        results[name] = {
            "architecture": arch.architecture,
            "hyperparameters": arch.model_dump(mode="json"),
            "matched": name.endswith("_matched"),
            "curve": c,
            "final": {
                "pw_mcc": c["pw_mcc"][-1],
                "pw_mcc_std": c["pw_mcc_std"][-1],
                "pw_mcc_pairs": recorders[name].pairs,
                "gt_mcc": c["gt_mcc"][-1],
                "gt_mcc_seed": {s: v[-1] for s, v in c["gt_mcc_seed"].items()},
                "l0": c["l0"][-1],
                "l0_seed": {s: v[-1] for s, v in c["l0_seed"].items()},
            },
            "pearson_r": _pearson(c["pw_mcc"], c["gt_mcc"]),
        }
        log.info(
            "organism %s: PW-MCC %.3f, GT-MCC %.3f, L0 %.2f",
            name,
            c["pw_mcc"][-1],
            c["gt_mcc"][-1],
            c["l0"][-1],
        )

    by_gt = sorted(names, key=lambda n: -results[n]["final"]["gt_mcc"])
    by_pw = sorted(names, key=lambda n: -results[n]["final"]["pw_mcc"])
    finals_gt = [results[n]["final"]["gt_mcc"] for n in names]
    finals_pw = [results[n]["final"]["pw_mcc"] for n in names]
    rho = float(spearmanr(finals_pw, finals_gt).statistic) if len(names) >= 3 else None
    null = null_baseline(cfg.organism_latents, cfg.organism_dims, draws=2, seed=0)
    log.info(
        "organism validation: %d conditions in %.1f s", len(names), time.perf_counter() - started
    )
    return {
        "experiment": "organism",
        "source": "Song, Muhamed et al. 2025 (arXiv 2505.20254), synthetic model organism",
        "conditions": results,
        "ordering": {
            "by_gt_mcc": by_gt,
            "by_pw_mcc": by_pw,
            "same_order": by_gt == by_pw,
            "spearman_rho": None if rho is None or math.isnan(rho) else rho,
            "pooled_pearson_r": _pearson(
                [v for n in names for v in results[n]["curve"]["pw_mcc"]],
                [v for n in names for v in results[n]["curve"]["gt_mcc"]],
            ),
        },
        "null_pw_mcc": null["pw_mcc"],
        "reference": REFERENCE["organism"],
        "settings": {
            **{k: v for k, v in cfg.model_dump(mode="json").items() if k.startswith("organism_")},
            "seed": cfg.seed,
            "training": training.model_dump(mode="json"),
            "n_steps": max(1, cfg.organism_tokens // cfg.organism_batch),
            "relu_l1_matched": ORGANISM_L1,
            "relu_l1_mismatched": ORGANISM_L1 / 10,
        },
    }
