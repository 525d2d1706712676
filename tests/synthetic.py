"""Synthetic sparse data from a known dictionary, and recovery of it by the real trainer.

The generator lives in `saedynamics.toy` (the validation of the metrics uses the same organism);
the trainer takes the samples from memory (`sources.TensorSource`), or from an activation file
written here where a test needs one.
The model organism of Song, Muhamed et al. 2025 (docs/spec/measurements.md section 1.4): a dictionary
A_true of m unit rows in d dimensions; every sample has exactly k active latents with values
|N(0, 1)|; x = s A_true. An SAE recovers the dictionary when its decoder rows match A_true's
(mean matched cosine, `metrics.consistency.mcc`); the paper reports near 1 for TopK at the true k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saedynamics.activations import ActivationFile, ActivationWriter
from saedynamics.config import TrainingConfig
from saedynamics.metrics.consistency import mcc
from saedynamics.saes import REGISTRY, load
from saedynamics.sources import TensorSource
from saedynamics.toy import organism_sample
from saedynamics.training import train_saes


def write_activations(path: Path, x, **extras: torch.Tensor) -> None:
    """Write samples x [n, d] as an activation file the trainer reads (extra columns optional)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    meta = {"step": 0, "layer": 0, "model": "synthetic"}
    writer = ActivationWriter(path, x.shape[1], meta, 4096, tuple(extras))
    idx = np.arange(len(x), dtype=np.int32)
    writer.append(idx, idx, idx, x, **extras)
    writer.close()


def organism_tensors(n=50_000, d=16, m=32, k=3, seed=0, extras=()) -> tuple[dict, np.ndarray]:
    """({"act": organism samples [n, d], stand-in extra columns}, A_true [m, d]).

    `extras`: stand-in extra columns for architectures that require them, drawn after the samples
    from the same RNG stream.
    """
    rng = np.random.default_rng(seed)
    a_true, codes = organism_sample(n, d, m, k, seed=rng)
    columns = {"act": torch.tensor(codes @ a_true, dtype=torch.float32)}
    if "lm_entropy" in extras:  # a stand-in "complexity": how much signal the sample carries
        columns["lm_entropy"] = torch.tensor(codes.sum(axis=1), dtype=torch.float32)
    if "lm_grad" in extras:  # a stand-in gradient: random directions
        columns["lm_grad"] = torch.tensor(rng.standard_normal((n, d)) * 0.01, dtype=torch.float32)
    return columns, a_true


def sparse_dataset(path: Path, n=50_000, d=16, m=32, k=3, seed=0, extras=()) -> np.ndarray:
    """Write an activation file of n organism samples (`organism_tensors`); return A_true [m, d]."""
    columns, a_true = organism_tensors(n, d, m, k, seed, extras)
    write_activations(path, columns.pop("act"), **columns)
    return a_true


def recovery(
    tmp_path: Path,
    name: str,
    hyper: dict,
    n_latents: int | None = None,
    train_tokens: int = 1_000_000,
    batch_size: int = 1024,
    seeds=(0, 1),
    d: int = 16,
    m: int = 32,
) -> list[float]:
    """Train `name` with `hyper` on the organism (d dims, m true latents, k = 3); return each
    seed's MCC to A_true. n_latents defaults to m."""
    cls = REGISTRY[name]
    columns, a_true = organism_tensors(d=d, m=m, extras=cls.requires)
    n_latents = n_latents or m
    arch = cls.Config(architecture=name, **hyper)
    training = TrainingConfig(
        n_latents=n_latents,
        seeds=list(seeds),
        train_tokens=train_tokens,
        batch_size=batch_size,
        input_scaling="centred",
        init_tokens=4096,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and immune to machine load
    try:
        identity = {"study": "organism", "step": 0, "layer": 0}
        train_saes(training, {name: arch}, TensorSource(columns), tmp_path, identity, {})
    finally:
        torch.set_num_threads(threads)
    return [mcc(load(tmp_path / name / f"seed{s}").W_dec, a_true) for s in seeds]


def make_sae(name: str, d_in=8, d_sae=32, seed=0, **hyper):
    """A registered architecture with `hyper`, its init drawn from `seed`."""
    cls = REGISTRY[name]
    return cls(
        d_in,
        d_sae,
        cls.Config(architecture=name, **hyper),
        generator=torch.Generator().manual_seed(seed),
    )


def tiny(name, d_in, d_sae, **hyper):
    """A small SAE whose parameters a test sets one by one (`set_parameters`)."""
    cls = REGISTRY[name]
    return cls(d_in, d_sae, cls.Config(architecture=name, **hyper))


@torch.no_grad()
def set_parameters(sae, **values):
    for name, value in values.items():
        getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def k_if_any(name: str, k: int) -> dict:
    """{"k": k} for architectures with a k hyperparameter, {} for the others."""
    return {"k": k} if "k" in REGISTRY[name].Config.model_fields else {}


def indexed_activation_file(path, n=1000, d=4, row_group=64) -> ActivationFile:
    """Activation file whose first coordinate is the row index (exact in float16 below 2048)."""
    writer = ActivationWriter(path, d, {"step": 0, "layer": 0}, row_group)
    act = torch.zeros(n, d)
    act[:, 0] = torch.arange(n)
    act[:, 1:] = torch.randn(n, d - 1, generator=torch.Generator().manual_seed(0))
    idx = np.arange(n, dtype=np.int32)
    for start in range(0, n, 37):  # appends that do not align with row groups
        sl = slice(start, start + 37)
        writer.append(idx[sl], idx[sl], idx[sl], act[sl])
    writer.close()
    return ActivationFile(path)


def record_row_group_reads(monkeypatch) -> list[int]:
    """The indices of the row groups ActivationFile reads from now on, in order."""
    reads: list[int] = []
    original = ActivationFile._row_groups

    def recorded(self, ids, columns):
        ids = list(ids)
        reads.extend(ids)
        return original(self, ids, columns)

    monkeypatch.setattr(ActivationFile, "_row_groups", recorded)
    return reads


def stateful_settings(batch: int) -> dict[str, dict]:
    """Hyperparameters under which an architecture's state outside its weights acts within 24
    steps of `batch` tokens: relu_2023 resamples at steps 7, 8, 18 and 19 (its generator and recent
    inputs), atm masks with probabilities far from 0 (its mask generator), adaptivek reaches its
    joint phase (deviation weight, probe-loss window)."""
    return {
        "relu_2023": {
            "lr": 0.05,
            "l1_coefficient": 30.0,
            "resample_at": (0.3, 0.35, 0.75, 0.8),
            "resample_sample_tokens": 4 * batch,
        },
        "atm": {"threshold_std": 0.0, "mask_rate": 1.0},
        "adaptivek": {"k_min": 2, "k_max": 8, "phase_ratio": 0.3},
    }
