"""The trainer's numerics: bf16 autocast keeps fp32 weights and Adam state; the sparse and dense
paths train the same SAE."""

from __future__ import annotations

import pytest
import torch

from saedynamics.config import TrainingConfig
from saedynamics.errors import ConfigError
from saedynamics.saes import REGISTRY, load
from saedynamics.sources import TensorSource
from saedynamics.training import train_saes

from .synthetic import k_if_any, make_sae, organism_tensors

COLUMNS, _ = organism_tensors(n=4096, d=16, m=32)


def train(tmp_path, name="topk", observe=None, **training):
    """Train `name` (k = 4 where it has a k) with two seeds on 4096 organism samples; return its
    directory (seed<s>/ inside), in a new run folder under tmp_path/runs."""
    cls = REGISTRY[name]
    config = TrainingConfig(
        **{
            "n_latents": 64,
            "seeds": [0, 1],
            "train_tokens": 2048,
            "batch_size": 256,
            "init_tokens": 256,
            "log_every": 1,
            **training,
        }
    )
    runs = tmp_path / "runs"
    out = runs / f"run{len(list(runs.iterdir())) if runs.exists() else 0}"
    arch = cls.Config(architecture=name, **k_if_any(name, 4))
    identity = {"study": "t", "step": 0, "layer": 0}
    train_saes(config, {name: arch}, TensorSource(COLUMNS), out, identity, {}, observe)
    return out / name


def each_sae(saes: dict):
    """The SAEs of the trainer's observe argument ({name: {seed: SAE}})."""
    return [sae for by_seed in saes.values() for sae in by_seed.values()]


def test_bf16_autocast_keeps_fp32_weights_and_optimizer_state(tmp_path):
    seen = []

    def observe(step, saes):
        for sae in each_sae(saes):
            state = [s for p in sae.parameters() for s in sae.optimizer.state[p].values()]
            seen.append({t.dtype for t in state if t.dim() > 0})
            seen.append({p.dtype for p in sae.parameters()})

    out = train(tmp_path, precision="bf16", observe=observe)
    assert len(seen) == 2 * 2 * 8  # every step, both seeds
    assert all(s == {torch.float32} for s in seen)
    assert load(out / "seed0").provenance["precision"] == "bf16 autocast, fp32 weights"
    assert load(out / "seed0").W_dec.dtype == torch.float32


def test_bf16_autocast_computes_in_bf16(tmp_path):
    """Under the trainer's autocast the encoder product really is bf16 (else the flag is inert)."""
    sae = make_sae("topk", 16, 64, k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sae.pre_acts(torch.randn(8, 16)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_and_dense_training_give_the_same_saes(tmp_path, name):
    dense = load(train(tmp_path, name, sparse_path="dense") / "seed1")
    sparse = load(train(tmp_path, name, sparse_path="sparse") / "seed1")
    for key, w in dense.weights().items():
        assert torch.allclose(sparse.weights()[key], w, atol=1e-4), key


def test_deterministic_switch_holds_during_training_only_and_changes_no_cpu_result(tmp_path):
    seen = []
    deterministic = train(
        tmp_path,
        deterministic=True,
        observe=lambda step, saes: seen.append(torch.are_deterministic_algorithms_enabled()),
    )
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # restored for whatever runs next
    assert load(deterministic / "seed0").provenance["deterministic_algorithms"] is True
    plain = train(tmp_path, deterministic=False)
    for seed in ("seed0", "seed1"):  # CPU kernels are deterministic either way
        a, b = load(plain / seed).weights(), load(deterministic / seed).weights()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_operation_without_deterministic_kernel_names_the_key(tmp_path, monkeypatch):
    """What torch raises on a GPU for such an operation becomes a message naming the switch."""
    torch_message = (
        "index_add_cuda_ does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
        "operation, or you can use the 'warn_only=True' option, if that's acceptable."
    )

    def loss(self, *args, **kwargs):
        raise RuntimeError(torch_message)

    monkeypatch.setattr(REGISTRY["topk"], "loss", loss)
    with pytest.raises(ConfigError, match=r"training\.deterministic.*index_add_cuda_") as err:
        train(tmp_path, deterministic=True)
    assert "Traceback" not in str(err.value)
    assert [p for p in (tmp_path / "runs").rglob("*") if p.is_file()] == []  # nothing written
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="index_add_cuda_"):  # switch off: torch's own error
        train(tmp_path, deterministic=False)


def test_init_and_data_order_streams_are_separate(tmp_path):
    """A seed's SAE depends on its own init stream and the job's data stream only: not on which
    other seeds train beside it; another data_seed changes it. Both streams are in cfg.json."""
    with_1 = load(train(tmp_path, seeds=[0, 1]) / "seed0")
    with_2 = load(train(tmp_path, seeds=[0, 2]) / "seed0")
    other_order = load(train(tmp_path, seeds=[0, 1], data_seed=1) / "seed0")
    assert all(torch.equal(w, with_2.weights()[k]) for k, w in with_1.weights().items())
    assert not torch.equal(with_1.W_dec, other_order.W_dec)
    assert (with_1.provenance["init_seed"], with_1.provenance["data_seed"]) == (0, 0)
    assert other_order.provenance["data_seed"] == 1
