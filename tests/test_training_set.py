"""Training a set of SAEs together changes nothing but the cost.

A train job trains every architecture x seed of a (step, layer) from one stream of batches
(saedynamics.training). On CPU, with one torch thread, each SAE of the set is bitwise the SAE that
architecture gives trained alone on the same data order: weights and loss curve. Here with every
registered architecture at once, at settings under which their stateful parts act within the run
(resampling, random masks, phases, counters). A resumed set is bitwise the uninterrupted one, and a
set that cannot fit the device stops before anything is allocated or written, saying how to split
it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saedynamics.config import TrainingConfig
from saedynamics.errors import ResourceError
from saedynamics.resources import human_bytes
from saedynamics.resume import CHECKPOINT, CHECKPOINT_KEY
from saedynamics.saes import REGISTRY
from saedynamics.sources import TensorSource
from saedynamics.training import train_saes, training_memory

from .synthetic import k_if_any, organism_tensors, stateful_settings

IDENTITY = {"study": "t", "step": 0, "layer": 0}
BATCH, D, LATENTS, SEEDS = 64, 16, 64, (0, 1)
EXTRAS = sorted({c for cls in REGISTRY.values() for c in cls.requires})  # lm_entropy, lm_grad

# Settings under which each architecture's state outside its weights acts within 24 steps.
STATEFUL = stateful_settings(BATCH)


def arch(name: str):
    cls = REGISTRY[name]
    return cls.Config(architecture=name, **{**k_if_any(name, 4), **STATEFUL.get(name, {})})


ALL = {name: arch(name) for name in sorted(REGISTRY)}


def training(**changes) -> TrainingConfig:
    return TrainingConfig(
        **{
            "n_latents": LATENTS,
            "seeds": list(SEEDS),
            "train_tokens": 24 * BATCH,
            "batch_size": BATCH,
            "init_tokens": 2 * BATCH,
            "input_scaling": "centred",
            "log_every": 1,
            "checkpoint_tokens": 8 * BATCH,  # with a resume folder: checkpoints after 8 and 16
            **changes,
        }
    )


@pytest.fixture(scope="module")
def source() -> TensorSource:
    """Organism samples with stand-in extra columns for the architectures that require them."""
    columns, _ = organism_tensors(n=2048, d=D, m=32, extras=EXTRAS)
    assert sorted(columns) == ["act", *EXTRAS]
    return TensorSource(columns)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise CPU results need a fixed thread count; tiny matrices anyway
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def together(tmp_path_factory, source, one_thread) -> Path:
    """Every registered architecture x 2 seeds in one train_saes call: out/<name>/seed<s>/."""
    out = tmp_path_factory.mktemp("set") / "saes"
    train_saes(training(), ALL, source, out, IDENTITY, {})
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL)  # and nothing else
    return out


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the SAEs in a/seed<s>/ and b/seed<s>/: any tensor of
    sae_weights.safetensors (bitwise), or the loss curve (training.parquet)."""
    found = []
    for seed in SEEDS:
        wa = load_file(a / f"seed{seed}" / "sae_weights.safetensors")
        wb = load_file(b / f"seed{seed}" / "sae_weights.safetensors")
        assert wa.keys() == wb.keys()
        found += [f"seed {seed}: {k}" for k in wa if not torch.equal(wa[k], wb[k])]
        curve_a = pq.read_table(a / f"seed{seed}" / "training.parquet")
        curve_b = pq.read_table(b / f"seed{seed}" / "training.parquet")
        assert curve_a.num_rows == curve_b.num_rows == 24
        if not curve_a.equals(curve_b):
            found.append(f"seed {seed}: loss curve")
    return found


def record(sae_dir: Path, seed: int = 0) -> dict:
    return json.loads((sae_dir / f"seed{seed}" / "cfg.json").read_text())["saedynamics"]


@pytest.mark.parametrize("name", sorted(ALL))
def test_an_architecture_trained_in_the_set_is_bitwise_the_one_trained_alone(
    tmp_path, name, source, together, one_thread
):
    train_saes(training(), {name: ALL[name]}, source, tmp_path, IDENTITY, {})
    assert differences(together / name, tmp_path / name) == []
    # the records differ only in naming the set
    alone, grouped = record(tmp_path / name), record(together / name)
    assert grouped.pop("trained_with") == sorted(ALL) and alone.pop("trained_with") == [name]
    assert alone == grouped


def test_the_comparison_sees_the_data_order(tmp_path, source, together, one_thread):
    """Another data_seed changes every architecture and seed: the equality above is not vacuous
    (each SAE's weights and curve depend on the batches it was given)."""
    train_saes(training(data_seed=1), ALL, source, tmp_path, IDENTITY, {})
    for name in ALL:
        found = differences(together / name, tmp_path / name)
        assert {f"seed {s}: loss curve" for s in SEEDS} <= set(found), name
        assert {f"seed {s}: W_dec" for s in SEEDS} <= set(found), name


class Stop(Exception):
    """Ends a training run in-process, as a kill would (the checkpoint written before it stays)."""


def test_a_resumed_set_is_bitwise_the_uninterrupted_one(tmp_path, source, together, one_thread):
    def stop_after_20(i, saes):
        assert sorted(saes) == sorted(ALL) and all(sorted(s) == list(SEEDS) for s in saes.values())
        if i + 1 == 20:
            raise Stop

    out, resume = tmp_path / "saes", tmp_path / "resume"
    with pytest.raises(Stop):
        train_saes(training(), ALL, source, out, IDENTITY, {}, stop_after_20, resume)
    assert not out.exists()
    with safe_open(resume / CHECKPOINT, framework="pt") as f:  # one checkpoint: the whole set
        header = json.loads(f.metadata()[CHECKPOINT_KEY])
    assert header["batches_done"] == 16
    assert sorted(header["saes"]) == sorted(f"{n}/seed{s}" for n in ALL for s in SEEDS)

    train_saes(training(), ALL, source, out, IDENTITY, {}, resume_dir=resume)
    assert not resume.exists()
    for name in ALL:
        assert differences(together / name, out / name) == [], name
        assert record(out / name)["resumed_from_tokens"] == [16 * BATCH]
        assert record(together / name)["resumed_from_tokens"] == []


# ---- memory --------------------------------------------------------------------------------------


def test_a_set_that_cannot_fit_stops_before_anything_is_written(tmp_path, source, monkeypatch):
    short = training(train_tokens=4 * BATCH)
    pair = {"topk": ALL["topk"], "relu_2023": ALL["relu_2023"]}
    need = training_memory(short, pair, D, source)
    total = sum(need.values())
    available = {"bytes": total - 1}
    monkeypatch.setattr("saedynamics.training.available_memory", lambda device: available["bytes"])
    out, resume = tmp_path / "saes", tmp_path / "resume"
    with pytest.raises(ResourceError) as err:
        train_saes(short, pair, source, out, IDENTITY, {}, resume_dir=resume)
    message = str(err.value)
    assert "4 SAEs (2 architectures x 2 seeds" in message
    assert f"need about {human_bytes(total)}" in message
    for part, amount in need.items():
        assert f"{part} {human_bytes(amount)}" in message
    assert f"cpu has {human_bytes(total - 1)} available" in message
    for key in ("split_by_architecture", "n_latents", "batch_size", "shuffle_tokens"):
        assert f"training.{key}" in message
    assert not out.exists() and not resume.exists()

    # one architecture: splitting the set would not help, so it is not suggested
    alone = {"topk": ALL["topk"]}
    available["bytes"] = 1000
    with pytest.raises(ResourceError) as err:
        train_saes(short, alone, source, out, IDENTITY, {}, resume_dir=resume)
    assert "2 SAEs (1 architectures x 2 seeds" in str(err.value)
    assert "split_by_architecture" not in str(err.value)
    assert "training.n_latents" in str(err.value)
    assert not out.exists() and not resume.exists()

    # what fits exactly trains
    available["bytes"] = total
    train_saes(short, pair, source, out, IDENTITY, {})
    assert sorted(p.name for p in out.iterdir()) == ["relu_2023", "topk"]


def test_the_memory_estimate_counts_the_sae_state(tmp_path, source, one_thread):
    """The estimate's "SAE state": per SAE its parameters, the trained ones' gradients and Adam's
    two moments (4 x, float32) and its buffers; counted by hand and in the live SAEs of a run."""
    pair = {"topk": ALL["topk"], "gated": ALL["gated"]}
    need = training_memory(training(), pair, D, source)
    n, d, fp32, int64 = LATENTS, D, 4, 8
    # parameters W_enc, W_dec, b_dec and b_enc (held at 0: no gradient or moments); buffer
    # tokens_since_fired
    topk = 4 * fp32 * (2 * n * d + d) + fp32 * n + int64 * n
    # parameters W_enc, W_dec, b_gate, r_mag, b_mag, b_dec; buffer tokens_since_fired
    gated = 4 * fp32 * (2 * n * d + 3 * n + d) + int64 * n
    assert need["SAE state"] == len(SEEDS) * (topk + gated)
    assert need["kept inputs"] == 0  # neither keeps inputs; relu_2023 keeps its resampling pool
    with_pool = training_memory(training(), {**pair, "r": ALL["relu_2023"]}, D, source)
    assert with_pool["kept inputs"] == 4 * BATCH * D * fp32  # resample_sample_tokens x d_model

    held = []

    def observe(step, saes):  # after an optimiser step: gradients and Adam's moments exist
        if step != 3:
            return
        total = 0
        for by_seed in saes.values():
            for sae in by_seed.values():
                for p in sae.parameters():
                    if not p.requires_grad:
                        total += p.numel() * p.element_size()
                        continue
                    moments = [t for t in sae.optimizer.state[p].values() if t.dim() > 0]
                    assert len(moments) == 2 and p.grad is not None
                    total += sum(t.numel() * t.element_size() for t in [p, p.grad, *moments])
                total += sum(b.numel() * b.element_size() for b in sae.buffers())
        held.append(total)

    train_saes(training(train_tokens=4 * BATCH), pair, source, tmp_path, IDENTITY, {}, observe)
    assert held == [need["SAE state"]]
