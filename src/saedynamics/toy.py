"""Toy models with known ground truth: do the metrics measure what they claim?

The workflow reports two kinds of numbers on language-model SAEs, whose true values nobody knows:
how many features a layer carries (effective features F, `metrics.superposition`) and whether SAEs
trained with different seeds find the same dictionary (PW-MCC, `metrics.consistency`). Here both
are computed, with the same code, on toy data whose answer is known, as the papers that proposed
them did. Each experiment returns plain JSON-able data; nothing here plots or writes results.

1. `superposition_validation`: effective features against toy models of superposition.
   Source: Bereska, Tzifa-Kratira, Samavi, Gavves 2025, "Superposition as Lossy Compression"
   (arXiv 2512.13568; the blog version, leonardbereska.github.io/blog/2025/superposition, holds
   the full main text), section 5.1 "Toy Model of Superposition", on the toy models of Elhage et
   al. 2022, "Toy Models of Superposition". The authors' repository (superposition-measurement)
   has no toy-model code, in any commit; its SAE (`experiments/adversarial/sae.py`) is theirs.
   - The paper's setting (`ValidationConfig.paper_superposition()`): "100 toy models with sparsity
     S in [0.001, 0.999]. Each model compresses 20 features through a 5-neuron bottleneck, with
     importance weights decaying as 0.7^i. After training to convergence, we extract 10,000
     activation samples and train SAEs with 40-dimensional dictionaries (8x expansion) and l1
     coefficient 0.1." The spacing of S is not stated; we log-space 1 - S from toy_min_density to
     toy_max_density (0.001 to 0.999). "Following Elhage et al.": their notebook trains with
     AdamW (PyTorch's default weight decay 0.01), lr 1e-3, batches of 1024, 10,000 steps, fresh
     samples every step; we use those for "to convergence".
   - Toy models: M = toy_features features f_i, each Uniform[0, 1] with probability 1 - S (the
     density) and 0 otherwise, independently; x = W f with W [N, M] (N = toy_hidden), read out as
     f' = ReLU(W^T x + b); trained to minimise sum_i I_i (f_i - f'_i)^2 with importance
     I_i = toy_importance_decay^i (mean over samples and features, Elhage et al.'s reduction);
     Xavier-normal W, b = 0.
   - Ground truth: the paper measures "superposition directly from W_toy" with its entropy measure
     but does not write out how W_toy enters p. We take p_i proportional to |W_:,i|^2 (`f_true`,
     the spec's choice: the share of feature i in |W|_F^2, so that F_true and psi_Frob =
     |W|_F^2 / N read the same quantity) and report p_i proportional to |W_:,i| (`f_true_norm`:
     the paper's footnote 2 speaks of "weight magnitude |w_i|", and an SAE that recovers the toy
     features exactly has codes f_i |W_:,i|) alongside, with r against both.
   - Measured: on toy_samples hidden activations h = W f of each model, the authors' SAE
     (`TiedSparseAutoencoder`): tied weights, z = ReLU(E h + b_e), h_hat = E^T z (no decoder
     bias), toy_sae_expansion * N latents, Xavier-uniform E, b_e = 0, the loss of the paper's
     eq. 5, |h - h_hat|^2 + toy_sae_l1 |z|_1 per sample (`tied_sae_loss`; toy_sae_loss "code":
     their `compute_loss`, which averages both over elements, a D / N = 8 times weaker l1),
     Adam lr toy_sae_lr; their `train_sae`:
     each epoch a fresh shuffle in batches of toy_sae_batch (the last one smaller), up to
     toy_sae_epochs epochs, stopping once the epoch's mean batch loss has not improved on its best
     for toy_sae_patience epochs (paper: 128, 800, 10). F_SAE = `effective_features` of the codes
     z over all toy_samples activations (paper eq. 6: p_i ~ sum_s |z_i,s|; the workflow's one
     implementation of F; F_true goes through the same function, with the weight shares as a
     single "token").
   - Reported: per model the density, F_true (both), F_SAE, the entropy measure on the SAE's
     weights (`f_sae_weights`, p_i ~ |E_i|, the paper's psi_Ours(W_sae)), psi_Frob of the toy
     weights and of the SAE's (`sae_psi_frob`, the paper's psi_Frob(W_sae)), the features
     with |W_:,i| > 0.5, the SAE's live latents, FVU and epochs (F_SAE null, with a reason,
     where no latent fires); the Pearson r of F_SAE against F_true across the models that have
     one (`pearson_r_models`), with its 95% interval over them (Fisher's z). The paper:
     r = 0.94 +- 0.02 through the SAE and 0.99 +- 0.01 on the toy weights, "across 100
     model-SAE pairs" (one sweep; the +- is not defined, the caption of its Fig. 3b speaks of 95%
     intervals across the 100 pairs). The JSON states every toy setting, `paper_setting`, and
     `differs_from_paper` (each field that differs: the paper's value and ours).
   - The defaults are a reduced setting for the workflow's every run (seconds, not the paper
     setting's 10-20 minutes on a shared CPU): 20 models, toy models 3000 steps of 256 at lr 3e-3,
     the SAE in batches of 512 for 150 epochs without early stopping.
   - Measured (docs/architectures.md): reduced r = 0.94 +- 0.01 (seeds 0-4; the paper
     0.94 +- 0.02); paper setting r = 0.88 +- 0.03 (seeds 0-2), r(psi_Frob, F_true) = 0.99
     (paper 0.99). With the code's loss: 0.90 and 0.82. Where r falls short: below density ~0.01
     the SAE ends with 10-16 live latents (tied weights reconstruct anything from the +- pairs of
     a basis), F_SAE ~ 10-13 while F_true reaches 13-15.
   All models, and then all SAEs, are trained at once as one batched tensor program: Adam's update
   is elementwise, so this is exactly training each separately (an SAE that stops early leaves the
   batch, with its rows of Adam's state).

2. `organism_validation`: PW-MCC against ground-truth recovery on a model organism.
   Source: Song, Muhamed et al. 2025 (arXiv 2505.20254), the synthetic model organism
   (docs/spec/measurements.md section 1.4; repository sae-feature-consistency, `synthetic/`).
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
     k reaches near 1, L1 lags: the authors' runs behind their Figs. 1-2 (the notebooks' saved
     output, 5 seeds, 30,000 full-batch steps at lr 1e-4) end at PW-MCC / GT-MCC 0.95 / 0.97
     (TopK, k = 3) and 0.61 / 0.63 (their 'standard' L1 SAE, L0 about 16: dense codes, as our
     relu_mismatched) (`REFERENCE`). Measured at the defaults (seed 0): final PW-MCC / GT-MCC
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
machine: about 20 s for the superposition sweep, 19 s for the organism (both logged; the paper's
superposition setting: `python -m saedynamics.toy --paper --seeds 0 --out r.json`, see `main`).
"""

from __future__ import annotations

import contextlib
import json
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

ORGANISM_LR = 1e-2
ORGANISM_L1 = 1.0  # ReLU + L1 lambda giving L0 near k = 3 at the defaults
ORGANISM_DEAD_FRACTION = 0.02  # dead_tokens / organism_tokens (Song et al.: 10M of 500M)
ORGANISM_CURVE_POINTS = 100
ORGANISM_EVAL_SAMPLES = 4096  # samples on which L0 is measured

REFERENCE = {  # what the papers report, for comparison (not pass/fail thresholds)
    "superposition": {"pearson_r_sae": 0.94, "pearson_r_sae_std": 0.02, "pearson_r_weights": 0.99},
    "organism": {
        "random_pw_mcc_32x16": 0.46,
        # the authors' runs behind their Figs. 1-2 (sae-feature-consistency, synthetic/*.ipynb,
        # the saved Plotly output at step 29,900 of 30,000): 5 seeds, mean GT-MCC and PW-MCC
        "authors_topk_k3": {"pw_mcc": 0.951, "gt_mcc": 0.968, "l0": 3.0},
        "authors_standard_l1": {"pw_mcc": 0.609, "gt_mcc": 0.631, "l0": 15.7},
    },
}
TOY_FIELDS = tuple(ValidationConfig.paper_superposition_settings())


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


def _fisher_ci(r: float | None, n: int) -> list[float] | None:
    """95% confidence interval of a Pearson r over n points (Fisher's z), or None."""
    if r is None or n < 4 or abs(r) >= 1:
        return None
    z, half = math.atanh(r), 1.959964 / math.sqrt(n - 3)
    return [math.tanh(z - half), math.tanh(z + half)]


# ==== 1. effective features on toy models of superposition =========================================


def superposition_setting(cfg: ValidationConfig) -> dict:
    """Whether cfg's toy fields are Bereska et al.'s, and if not, which differ and how."""
    paper = ValidationConfig.paper_superposition_settings()
    ours = cfg.model_dump(mode="json")
    reduced = {k: {"paper": v, "ours": ours[k]} for k, v in paper.items() if ours[k] != v}
    return {"paper_setting": not reduced, "differs_from_paper": reduced}


def feature_densities(cfg: ValidationConfig) -> np.ndarray:
    """1 - S of each toy model: log-spaced from toy_min_density to toy_max_density."""
    lo, hi = math.log10(cfg.toy_min_density), math.log10(cfg.toy_max_density)
    return np.logspace(lo, hi, cfg.toy_models)


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
    opt = torch.optim.AdamW([w, b], lr=cfg.toy_lr, weight_decay=cfg.toy_weight_decay)
    for _ in range(cfg.toy_steps):
        f = sample_features(density, cfg.toy_batch, m, generator)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Bereska et al.'s tied ReLU SAE on each model's activations h [models, samples, N].

    As their `train_sae`: each epoch a fresh shuffle of the samples in batches of toy_sae_batch
    (the last one smaller), Adam; an SAE stops when its epoch's mean batch loss has not improved
    on its best for toy_sae_patience epochs (0: never), keeping the weights it has then (their
    "best" state is a shallow copy of the live state_dict, so it restores nothing).
    Returns (E [models, D, N], b_e [models, D], epochs trained [models]); codes z = ReLU(E h + b_e),
    h_hat = E^T z.
    """
    k, n_samples, n = h.shape
    d = cfg.toy_sae_expansion * n
    bound = math.sqrt(6.0 / (d + n))  # Xavier uniform of nn.Linear(N, D).weight
    e_out = (torch.rand(k, d, n, generator=generator) * 2 - 1) * bound
    b_out = torch.zeros(k, d)
    epochs = torch.full((k,), cfg.toy_sae_epochs, dtype=torch.long)
    # the SAEs still training: `alive` indexes them; e, b and Adam's state hold only their rows
    alive = torch.arange(k)
    e, b = e_out.clone().requires_grad_(True), b_out.clone().requires_grad_(True)
    opt = torch.optim.Adam([e, b], lr=cfg.toy_sae_lr)
    batch = cfg.toy_sae_batch
    starts = range(0, n_samples, batch)
    best = torch.full((k,), math.inf, dtype=torch.float64)
    best_epoch = torch.zeros(k, dtype=torch.long)
    for epoch in range(cfg.toy_sae_epochs):
        # every SAE's own shuffle, drawn for all k whichever are still training (same stream)
        order = torch.argsort(torch.rand(k, n_samples, generator=generator), dim=1)[alive]
        shuffled = torch.take_along_dim(h[alive], order[:, :, None], dim=1)
        total = torch.zeros(len(alive), dtype=torch.float64)
        for i in starts:
            x = shuffled[:, i : i + batch]
            loss = tied_sae_loss(x, e, b, cfg.toy_sae_l1, cfg.toy_sae_loss)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # independent per model
            opt.step()
            total += loss.detach().double()
        if cfg.toy_sae_patience == 0:
            continue
        epoch_loss = total / len(starts)
        improved = epoch_loss < best[alive]
        best[alive] = torch.where(improved, epoch_loss, best[alive])
        best_epoch[alive] = torch.where(improved, epoch, best_epoch[alive])
        stop = ~improved & (epoch - best_epoch[alive] >= cfg.toy_sae_patience)
        if stop.any():  # those SAEs keep the weights they have now; drop them from the batch
            gone, keep = alive[stop], ~stop
            e_out[gone], b_out[gone] = e.detach()[stop], b.detach()[stop]
            epochs[gone] = epoch + 1
            alive = alive[keep]
            if len(alive) == 0:
                break
            e, b, opt = _keep_rows(opt, e, b, keep, cfg.toy_sae_lr)
    e_out[alive], b_out[alive] = e.detach(), b.detach()
    return e_out, b_out, epochs


def _keep_rows(opt: torch.optim.Adam, e: Tensor, b: Tensor, keep: Tensor, lr: float):
    """(e, b, an Adam over them) with only rows `keep` of the models: Adam's update is
    elementwise, so the kept rows continue exactly as they would have."""
    new = [p.detach()[keep].clone().requires_grad_(True) for p in (e, b)]
    new_opt = torch.optim.Adam(new, lr=lr)
    for old_p, new_p in zip((e, b), new, strict=True):
        state = opt.state[old_p]
        new_opt.state[new_p] = {
            "step": state["step"].clone(),
            "exp_avg": state["exp_avg"][keep].clone(),
            "exp_avg_sq": state["exp_avg_sq"][keep].clone(),
        }
    return new[0], new[1], new_opt


def tied_sae_loss(x: Tensor, e: Tensor, b: Tensor, l1: float, form: str) -> Tensor:
    """Each model's loss on a batch x [models, samples, N]: [models].

    "eq5", the paper's eq. 5: ||x - x'||_2^2 + l1 * ||z||_1 per sample, averaged over the batch.
    "code", the authors' `compute_loss`: mean squared error + l1 * mean |z|, both averaged over
    every element (so l1 weighs D / N = 8 times less against the error than in eq. 5).
    """
    z = tied_sae_codes(x, e, b)
    error = (x - torch.bmm(z, e)).pow(2)
    if form == "eq5":
        return error.sum(dim=2).mean(dim=1) + l1 * z.abs().sum(dim=2).mean(dim=1)
    return error.mean(dim=(1, 2)) + l1 * z.abs().mean(dim=(1, 2))


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
        toy_seconds = time.perf_counter() - started
        density = torch.tensor(feature_densities(cfg))
        f = sample_features(density, cfg.toy_samples, cfg.toy_features, toy_gen)
        h = torch.bmm(f, w.transpose(1, 2))  # hidden activations [models, samples, N]
        with torch.enable_grad():
            e, b, epochs = train_tied_saes(h, cfg, sae_gen)
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
                    # no latent active on any sample (a strong l1): F of the codes is undefined
                    "f_sae": measured["effective_features"] if measured["alive_latents"] else None,
                    "f_sae_reason": None if measured["alive_latents"] else "no active latent",
                    "f_sae_weights": weight_effective_features(e[i].T, power=1.0),
                    "sae_psi_frob": float(e[i].double().pow(2).sum() / n),
                    "psi_frob": float(w[i].double().pow(2).sum() / n),
                    "represented_features": int((norms > 0.5).sum()),
                    "sae_alive_latents": measured["alive_latents"],
                    "sae_fvu": float(fvu[i]),
                    "sae_epochs": int(epochs[i]),
                }
            )
    wall = time.perf_counter() - started
    column = {key: [row[key] for row in models] for key in models[0]}
    with_f = [row for row in models if row["f_sae"] is not None]  # r over these
    f_sae = [row["f_sae"] for row in with_f]
    r = _pearson(f_sae, [row["f_true"] for row in with_f])
    result = {
        "experiment": "superposition",
        "source": "Bereska et al. 2025 section 5.1 on Elhage et al. 2022 toy models",
        "models": models,
        "pearson_r": r,
        "pearson_r_ci95": _fisher_ci(r, len(with_f)),
        "pearson_r_models": len(with_f),
        "pearson_r_norm": _pearson(f_sae, [row["f_true_norm"] for row in with_f]),
        "pearson_r_psi_frob": _pearson(column["psi_frob"], column["f_true"]),
        "pearson_r_norm_psi_frob": _pearson(column["psi_frob"], column["f_true_norm"]),
        "pearson_r_sae_weights": _pearson(column["f_sae_weights"], column["f_true"]),
        "reference": REFERENCE["superposition"],
        **superposition_setting(cfg),
        "settings": {
            **{k: v for k, v in cfg.model_dump(mode="json").items() if k in TOY_FIELDS},
            "seed": cfg.seed,
            "sae_latents": cfg.toy_sae_expansion * n,
            "densities": "log-spaced 1 - S from toy_min_density to toy_max_density",
            "toy_optimizer": "AdamW (Elhage et al.'s notebook), constant lr",
            "sae_optimizer": "Adam, constant lr",
            "f_true": "exp(H(p)), p_i ~ |W_:,i|^2 (f_true_norm: p_i ~ |W_:,i|)",
            "f_sae": "exp(H(p)), p_i ~ sum over samples of |z_i| (paper eq. 6)",
        },
        "wall_seconds": {"toy_models": round(toy_seconds, 1), "total": round(wall, 1)},
    }
    log.info(
        "superposition validation (%s): %d toy models, r(F_SAE, F_true) = %s, in %.1f s",
        "paper setting" if result["paper_setting"] else "reduced setting",
        cfg.toy_models,
        "n/a" if r is None else f"{r:.3f}",
        wall,
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


# ==== the paper's toy setting as a one-off run ======================================================


def superposition_seeds(cfg: ValidationConfig, seeds: list[int]) -> dict:
    """`superposition_validation` at each seed: r per seed and its mean +- std over the seeds."""
    runs = [superposition_validation(cfg.model_copy(update={"seed": s})) for s in seeds]

    def spread(key: str) -> dict:
        values = [run[key] for run in runs]
        ok = [v for v in values if v is not None]
        return {
            "per_seed": values,
            "mean": float(np.mean(ok)) if ok else None,
            "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
        }

    keys = ("pearson_r", "pearson_r_norm", "pearson_r_psi_frob", "pearson_r_sae_weights")
    return {
        "experiment": "superposition_seeds",
        "seeds": list(seeds),
        **{key: spread(key) for key in keys},
        "paper_setting": runs[0]["paper_setting"],
        "differs_from_paper": runs[0]["differs_from_paper"],
        "settings": {k: v for k, v in runs[0]["settings"].items() if k != "seed"},
        "reference": REFERENCE["superposition"],
        "wall_seconds": [run["wall_seconds"]["total"] for run in runs],
        "runs": runs,
    }


def _json_or_text(value: str):
    """A --set value: JSON where it parses (numbers, lists, true), else the text (e.g. code)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> int:
    """python -m saedynamics.toy [--paper] [--set key=value ...] --seeds 0 1 2 --out r.json

    The superposition validation alone (the workflow's `validation` rule runs it with the organism
    at the study's settings), e.g. in Bereska et al.'s setting over several seeds.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m saedynamics.toy", description=main.__doc__)
    parser.add_argument("--paper", action="store_true", help="Bereska et al.'s toy setting")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {k: _json_or_text(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = (
        ValidationConfig.paper_superposition(**overrides)
        if args.paper
        else ValidationConfig(**overrides)
    )
    result = superposition_seeds(cfg, args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    r = result["pearson_r"]
    log.info("r(F_SAE, F_true) over seeds %s: %s +- %s", args.seeds, r["mean"], r["std"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
