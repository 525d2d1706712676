"""The stages one by one: corpus, offline hub download, activation cache and reader, training."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saedynamics.activations import ActivationFile, ActivationWriter, read_metadata, schema
from saedynamics.artifacts import read_json, sha256_file
from saedynamics.caching import cache_activations
from saedynamics.checkpoints import download_checkpoint, download_tokenizer
from saedynamics.cli import main
from saedynamics.config import (
    ActivationsConfig,
    CorpusConfig,
    TokensConfig,
    TrainingConfig,
    load_config,
)
from saedynamics.corpus import build_token_sample, iter_texts, read_token_sample
from saedynamics.errors import ConfigError, DataError, TrainingDiverged
from saedynamics.saes import REGISTRY, SAE, load
from saedynamics.sources import FileSource
from saedynamics.training import lr_multiplier, train_saes

from .conftest import HUB_REPO_ID, hub_model, tiny_neox
from .synthetic import indexed_activation_file as synthetic_file
from .synthetic import record_row_group_reads

# ---- corpus and tokens -------------------------------------------------------------------------------


def test_pydoc_corpus_ships_with_python():
    texts = list(iter_texts(CorpusConfig(source="pydoc")))
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000


def test_token_sample_is_fixed_and_split(tmp_path, tiny_cfg):
    paths = []
    for run in ("a", "b"):
        out = tmp_path / run
        build_token_sample(
            tiny_cfg.corpus, tiny_cfg.tokens, tiny_cfg.model, out / "tokens", out / "tok"
        )
        paths.append(out / "tokens")
    train_a, train_b = read_token_sample(paths[0], "train"), read_token_sample(paths[1], "train")
    assert np.array_equal(train_a[1], train_b[1]) and np.array_equal(train_a[0], train_b[0])
    docs_eval, eval_tokens = read_token_sample(paths[0], "eval")
    assert train_a[1].shape == (400, 32) and eval_tokens.shape == (40, 32)
    assert not set(docs_eval) & set(train_a[0])  # disjoint windows
    shards = sorted(p.name for p in paths[0].iterdir())
    assert shards == ["eval.parquet", "manifest.json", "train-00000.parquet"]
    assert pq.read_schema(paths[0] / "eval.parquet").names == ["doc_id", "token_ids"]
    assert (tmp_path / "a/tok/tokenizer.json").exists()


def test_files_corpus_and_a_wrong_text_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert list(
        iter_texts(CorpusConfig(source="files", data_files=[str(f)], text_field="body"))
    ) == ["one", "two"]
    with pytest.raises(ConfigError, match="no field 'text'; their fields are body"):
        list(iter_texts(CorpusConfig(source="files", data_files=[str(f)])))


# ---- the hub path, offline ------------------------------------------------------------------------------


def test_hub_checkpoints_download_offline(offline_hub, tmp_path):
    model = hub_model(offline_hub)
    manifests = []
    for step in (0, 1, 2):
        earlier = [tmp_path / f"step{s}/manifest.json" for s in range(step)]
        manifests.append(download_checkpoint(model, step, tmp_path / f"step{step}", earlier))
    repo = offline_hub / ("models--" + HUB_REPO_ID.replace("/", "--"))
    for step, m in zip((0, 1, 2), manifests, strict=True):
        assert m["commit"] == (repo / "refs" / f"step{step}").read_text()
        assert (
            m["revision"] == f"step{step}"
            and read_json(tmp_path / f"step{step}/manifest.json") == m
        )
        for name, digest in m["files"].items():  # the recorded hashes are those of the files
            assert sha256_file(tmp_path / f"step{step}" / name) == digest
    assert manifests[0]["duplicate_of"] is None
    assert manifests[1]["duplicate_of"] == 0  # byte-identical weights, as Pythia's step0/step1
    assert manifests[2]["duplicate_of"] is None
    # step2 shipped only pickled weights: converted, and the pickle is not copied
    assert "pytorch_model.bin" in manifests[2]["source_files"]
    assert sorted(p.name for p in (tmp_path / "step2").glob("*model*")) == ["model.safetensors"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "step2")
    reference = tiny_neox(loaded.config.vocab_size, seed=2)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_hub_missing_revision_and_tokenizer(offline_hub, tmp_path):
    with pytest.raises(
        DataError, match=r"cannot get saedynamics-tests/tiny-neox at revision 'step4'"
    ):
        download_checkpoint(hub_model(offline_hub), 4, tmp_path / "step4", [])
    assert not (tmp_path / "step4").exists()
    info = download_tokenizer(hub_model(offline_hub), tmp_path)
    assert info["revision"] == "step2" and (tmp_path / "tokenizer.json").exists()


# ---- activations ------------------------------------------------------------------------------------------


@pytest.fixture()
def hub_activations(hub_stage):
    """Tokens (local files corpus, hub tokenizer), checkpoint step2, and its cached activations."""
    raw, root = hub_stage
    cfg = load_config(raw)
    stats = cache_activations(cfg.activations, root / "ckpt", root / "tokens", root / "acts")
    return cfg, root, stats


def stored_vectors(table: pa.Table, column: str) -> np.ndarray:
    """A vector column read as any tool can: a fixed-size list of numbers per row."""
    return np.stack(table.column(column).to_pandas())


def test_activation_cache_round_trip(hub_activations):
    cfg, root, stats = hub_activations
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    docs, windows = read_token_sample(root / "tokens", "eval")
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    for layer in (0, 1):
        path = root / f"acts/layer{layer}/eval.parquet"
        assert pq.read_schema(path).remove_metadata() == schema(32)
        table = pq.read_table(path)
        assert table.num_rows == 16 * 15  # position 0 dropped
        assert table.column("pos").to_numpy().min() == 1
        meta = read_metadata(path)
        assert meta["d_model"] == 32 and meta["split"] == "eval"
        stored = stored_vectors(table, "act").astype(np.float32)
        assert np.array_equal(stored, ActivationFile(path).read()["act"])  # float16 values
        assert (
            meta["layer"] == layer
            and meta["revision"] == "step2"
            and meta["hook"] == f"gpt_neox.layers.{layer}"
        )
        norms = np.linalg.norm(stored.astype(np.float64), axis=1)
        assert meta["norm"]["mean_norm"] == pytest.approx(norms.mean())
        assert meta["lm_eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
        if layer == 0:  # hidden_states[1] is block 0's output
            expected = out.hidden_states[1][:, 1:].reshape(-1, 32).numpy()
            assert np.allclose(stored, expected, atol=2e-3, rtol=2e-3)
        else:  # the last hidden state is after the final LayerNorm: the stored one is before it
            final = out.hidden_states[2][:, 1:].reshape(-1, 32)
            assert not np.allclose(stored, final.numpy(), atol=1e-2)
            with torch.no_grad():
                normed = model.gpt_neox.final_layer_norm(torch.from_numpy(stored))
            assert torch.allclose(normed, final, atol=2e-2)
    assert stats["lm_eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_reader_streams_a_seeded_shuffle(tmp_path, monkeypatch):
    f = synthetic_file(tmp_path / "a.parquet")
    assert f.n_rows == 1000 and len(f.row_group_rows) == 16 and f.d_model == 4
    ordered = f.read()["act"][:, 0]
    assert np.array_equal(ordered, np.arange(1000.0))
    source = FileSource(f)

    def first_epoch(seed, buffer_rows=8192):
        stream = source.batches(128, ("act",), seed=seed, buffer_rows=buffer_rows)
        return torch.cat([next(stream)["act"] for _ in range(1000 // 128)])[:, 0]

    rows = first_epoch(3)
    assert len(set(rows.tolist())) == len(rows) == 896  # no row twice within an epoch
    assert not torch.equal(rows, torch.arange(896.0))  # shuffled
    assert torch.equal(rows, first_epoch(3)) and not torch.equal(rows, first_epoch(4))
    # streaming: the first batch needs only the first buffer of row groups, not the file
    calls = record_row_group_reads(monkeypatch)
    first_epoch(0, buffer_rows=4 * 64)
    assert len(calls) == 16  # a buffer of 4 row groups at a time, read once each
    calls.clear()
    next(source.batches(128, ("act",), seed=0, buffer_rows=4 * 64))
    assert len(calls) == 4  # tests/test_activation_io.py: the order and what is read when


def test_unreadable_activation_files_are_named(tmp_path):
    good = synthetic_file(tmp_path / "good.parquet").path
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 100)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(DataError, match=f"{path}: not a readable activation file"):
            ActivationFile(path)
    with pytest.raises(DataError, match="no such activation file"):
        ActivationFile(tmp_path / "missing.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    with pytest.raises(DataError, match=f"{plain}"):
        ActivationFile(plain)


def test_writer_refuses_float16_overflow_and_leaves_nothing(tmp_path):
    writer = ActivationWriter(tmp_path / "big.parquet", 2, {}, 8)
    with pytest.raises(DataError, match="overflow float16"):
        writer.append(
            np.zeros(1, np.int32),
            np.zeros(1, np.int32),
            np.zeros(1, np.int32),
            torch.tensor([[1e6, 0.0]]),
        )
    writer.discard()
    assert list(tmp_path.iterdir()) == []


# ---- training ---------------------------------------------------------------------------------------------


def sparse_file(path, n=4096, d=16, n_features=48, seed=0):
    """Activations that really are sparse combinations of a few directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    codes = torch.rand(n, n_features, generator=g) * (torch.rand(n, n_features, generator=g) < 0.06)
    act = codes @ features + 2.0
    writer = ActivationWriter(path, d, {"step": 0, "layer": 0, "model": "synthetic"}, 512)
    idx = np.arange(n, dtype=np.int32)
    writer.append(idx, idx, idx, act)
    writer.close()
    return path


def training_config(**over):
    return TrainingConfig(
        **{
            "n_latents": 64,
            "seeds": [0, 1],
            "train_tokens": 60_000,
            "batch_size": 256,
            "input_scaling": "centred",
            **over,
        }
    )


IDENTITY = {"study": "t", "step": 0, "layer": 0}


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_training_learns_and_writes_every_seed(tmp_path, name):
    acts = sparse_file(tmp_path / "train.parquet")
    hyper = {"topk": {"k": 4, "lr": 0.004}, "relu": {"l1_coefficient": 0.5, "lr": 0.003}}[name]
    arch = REGISTRY[name].Config(architecture=name, **hyper)
    observed = []

    def observe(step, saes):
        assert all(isinstance(sae, SAE) for by_seed in saes.values() for sae in by_seed.values())
        observed.append((step, {n: sorted(by_seed) for n, by_seed in saes.items()}))

    training = training_config()
    source = FileSource(ActivationFile(acts))
    train_saes(training, {name: arch}, source, tmp_path / "out", IDENTITY, {}, observe)
    n_steps = 60_000 // 256
    logged = sorted({*range(0, n_steps, training.log_every), n_steps - 1})  # loss-curve steps
    assert observed == [(i, {name: [0, 1]}) for i in logged]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [name]
    for seed in (0, 1):
        d = tmp_path / "out" / name / f"seed{seed}"
        cfg = json.loads((d / "cfg.json").read_text())["saedynamics"]
        assert cfg["seed"] == cfg["init_seed"] == seed and cfg["data_seed"] == 0
        assert cfg["tokens_seen"] == n_steps * 256 and cfg["input_scale"] > 0
        assert cfg["architecture_name"] == name and cfg["trained_with"] == [name]
        curve = pq.read_table(d / "training.parquet").to_pandas()
        assert curve["fvu"].iloc[-1] < 0.5 * curve["fvu"].iloc[0]
        # the saved SAE works on raw activations as the trained one did on scaled ones (FVU is scale-free)
        sae = load(d)
        x = torch.tensor(ActivationFile(acts).read()["act"]).float()
        with torch.no_grad():
            raw_fvu = (((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
        assert raw_fvu == pytest.approx(curve["fvu"].iloc[-5:].mean(), abs=0.05)
        assert curve["train_step"].tolist() == logged


def test_training_is_deterministic_on_cpu(tmp_path):
    acts = sparse_file(tmp_path / "train.parquet")
    topk = REGISTRY["topk"].Config(architecture="topk", k=4, lr=0.004)
    relu = REGISTRY["relu"].Config(architecture="relu", l1_coefficient=0.5, lr=0.003)
    training = training_config(train_tokens=10_000)
    for run, architectures in (("a", {"topk": topk}), ("b", {"topk": topk}),
                               ("set", {"relu": relu, "topk": topk})):  # fmt: skip
        source = FileSource(ActivationFile(acts))
        train_saes(training, architectures, source, tmp_path / run, IDENTITY, {})
    a = (tmp_path / "a/topk/seed1/sae_weights.safetensors").read_bytes()
    assert a == (tmp_path / "b/topk/seed1/sae_weights.safetensors").read_bytes()
    assert a != (tmp_path / "a/topk/seed0/sae_weights.safetensors").read_bytes()
    # trained in a set with another architecture: the same SAE (the same batches, its own RNG)
    assert a == (tmp_path / "set/topk/seed1/sae_weights.safetensors").read_bytes()
    assert (tmp_path / "set/relu/seed1/sae_weights.safetensors").exists()


def test_nan_loss_stops_training_and_writes_nothing(tmp_path, capsys):
    acts = sparse_file(tmp_path / "train.parquet")
    arch = REGISTRY["relu"].Config(architecture="relu", lr=1e30)  # diverges on the first update
    topk = REGISTRY["topk"].Config(architecture="topk", k=4)
    with pytest.raises(
        TrainingDiverged, match=r"^relu \(step 0, layer 0\), seed 0: the loss is (nan|inf) at "
        "training step 1 of"
    ):  # fmt: skip
        train_saes(
            training_config(),
            {"topk": topk, "relu": arch},
            FileSource(ActivationFile(acts)),
            tmp_path / "out",
            IDENTITY,
            {},
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # through the CLI: one message, exit 1
    settings = {
        "study": "t",
        "training": training_config().model_dump(mode="json"),
        "architectures": {"relu": arch.model_dump(mode="json")},
    }
    rc = main(
        [
            "train",
            "--settings",
            json.dumps(settings),
            "--step",
            "0",
            "--layer",
            "0",
            "--activations",
            str(acts),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 1 and "No SAE was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lr_schedule():
    values = [lr_multiplier(i, 100, 0.1, 0.2) for i in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[50] == 1.0
    assert (
        values[80] == 1.0 and values[90] == pytest.approx(0.5) and values[99] == pytest.approx(0.05)
    )
    # no warm-up, no decay: constant, also at the scheduler's final step (= total)
    assert [lr_multiplier(i, 10, 0.0, 0.0) for i in range(11)] == [1.0] * 11


def test_activations_config_rejects_layers_the_checkpoint_lacks(hub_activations):
    cfg, root, _ = hub_activations
    with pytest.raises(DataError, match=r"the model has 2 layers; layers \[3\] do not exist"):
        cache_activations(
            ActivationsConfig(layers=[0, 3]), root / "ckpt", root / "tokens", root / "x"
        )
    assert not (root / "x").exists() or not any((root / "x").rglob("*.parquet"))


def test_token_sample_too_small(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="the config asks for"):
        build_token_sample(
            tiny_cfg.corpus,
            TokensConfig(context_length=32, train_sequences=10**7),
            tiny_cfg.model,
            tmp_path / "t.parquet",
            tmp_path / "tok",
        )
    assert not (tmp_path / "t.parquet").exists()


def test_extra_columns_entropy_and_gradient(hub_stage, tmp_path):
    acts_cfg = ActivationsConfig(layers=[0], extra_columns=["lm_entropy", "lm_grad"])
    cache_activations(acts_cfg, tmp_path / "ckpt", tmp_path / "tokens", tmp_path / "acts")
    table = pq.read_table(tmp_path / "acts/layer0/train.parquet")  # training reads them
    extras = ("lm_entropy", "lm_grad")
    assert pq.read_schema(tmp_path / "acts/layer0/train.parquet").remove_metadata() == schema(
        32, extras
    )
    # the measurements read only the activations: the eval split stores no extra columns
    assert pq.read_schema(tmp_path / "acts/layer0/eval.parquet").remove_metadata() == schema(32)
    stored_grad = stored_vectors(table, "lm_grad")
    assert stored_grad.dtype == np.float32
    stored_entropy = table.column("lm_entropy").to_numpy()
    # an independent route: gradients w.r.t. hidden_states[1] (block 0's output)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    _, windows = read_token_sample(tmp_path / "tokens", "train")
    ids = torch.from_numpy(windows.astype(np.int64))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_hidden_states=True)
    logp = out.logits.float().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    (grad,) = torch.autograd.grad(nll.sum(), out.hidden_states[1])
    assert np.allclose(stored_grad, grad[:, 1:].reshape(-1, 32).numpy(), atol=1e-5, rtol=1e-3)
    entropy = -(logp.exp() * logp).sum(-1)[:, 1:].reshape(-1)
    assert np.allclose(stored_entropy, entropy.detach().numpy(), atol=1e-4)
    assert 0 < stored_entropy.max() <= np.log(model.config.vocab_size) + 1e-4
    # the source serves them alongside act
    source = FileSource(ActivationFile(tmp_path / "acts/layer0/train.parquet"))
    batch = next(source.batches(64, ("act", "lm_grad", "lm_entropy"), seed=0, buffer_rows=4096))
    assert batch["lm_grad"].shape == (64, 32) and batch["lm_entropy"].shape == (64,)
    with pytest.raises(DataError, match=r"has no column\(s\) \['nope'\]"):
        next(source.batches(64, ("act", "nope"), seed=0, buffer_rows=4096))


def test_activation_settings_add_the_columns_architectures_need(tiny_raw):
    from saedynamics.saes.base import SAE

    raw = {**tiny_raw, "architectures": {"topk": {"architecture": "topk", "k": 4}}}
    assert load_config(raw).stage_settings("activations")["activations"]["extra_columns"] == []
    original = REGISTRY["topk"].requires
    try:
        REGISTRY["topk"].requires = ("lm_grad",)
        assert load_config(raw).stage_settings("activations")["activations"]["extra_columns"] == [
            "lm_grad"
        ]
    finally:
        REGISTRY["topk"].requires = original
    assert SAE.requires == ()
