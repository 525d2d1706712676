"""training.source stream (streaming.py): activations computed from the checkpoint inside the train
job. It deals the tokens the cached file holds, resumes bitwise after real kills, and refuses what
cannot work before training, with one message naming the key or file.

The study is conftest's hub study: a tiny GPT-NeoX (d 32, 2 layers) from the local HF cache, a token
sample of 64 train and 16 eval windows of 16 tokens (960 train rows), the checkpoint of step 2.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from saedynamics.activations import ActivationFile
from saedynamics.caching import cache_activations
from saedynamics.config import ActivationsConfig, TrainingConfig, load_config
from saedynamics.errors import DataError
from saedynamics.saes import REGISTRY
from saedynamics.sources import FileSource
from saedynamics.streaming import StreamSource
from saedynamics.training import train_saes

from .conftest import cli_error
from .kill_at import run

LAYER, ROWS = 1, 64 * 15  # train windows x (16 - the first position)
IDENTITY = {"study": "t", "step": 2, "layer": LAYER}


@pytest.fixture()
def study(hub_stage):
    """(raw config, folder with tokens/, ckpt/ and both activation caches of step 2)."""
    raw, root = hub_stage
    cfg = load_config(raw)
    cache_activations(cfg.activations, root / "ckpt", root / "tokens", root / "acts")
    return raw, root


def stream(root: Path, cfg: ActivationsConfig, **options) -> StreamSource:
    eval_file = ActivationFile(root / f"acts/layer{LAYER}/eval.parquet")
    return StreamSource(root / "ckpt", root / "tokens", LAYER, eval_file, cfg, torch.device("cpu"))


def one_epoch(source, batch: int, buffer_rows: int, columns=("doc_id", "pos", "act")) -> dict:
    batches = source.batches(batch, columns, seed=3, buffer_rows=buffer_rows)
    out = [next(batches) for _ in range(ROWS // batch)]
    return {c: torch.cat([b[c] for b in out]) for c in columns}


def test_stream_deals_the_tokens_and_activations_the_cache_holds(study):
    raw, root = study
    cfg = load_config(raw).activations
    cached = FileSource(ActivationFile(root / f"acts/layer{LAYER}/train.parquet"))
    live = stream(root, cfg)
    assert (
        live.d_model == cached.d_model
        and live.norm == ActivationFile(root / f"acts/layer{LAYER}/eval.parquet").norm
    )
    for buffer_rows in (10**6, 200):  # resident, and a forward pass per buffer
        a, b = one_epoch(cached, 96, buffer_rows), one_epoch(live, 96, buffer_rows)
        # one epoch: every train token once in both, in different orders (blocks differ)
        tokens = [
            Counter(zip(x["doc_id"].tolist(), x["pos"].tolist(), strict=True)) for x in (a, b)
        ]
        assert tokens[0] == tokens[1] and len(tokens[0]) == ROWS
        assert not torch.equal(a["doc_id"], b["doc_id"])
        # each token's activation is the cached one, to float16 rounding of another batching
        order = [np.lexsort((x["pos"].numpy(), x["doc_id"].numpy())) for x in (a, b)]
        torch.testing.assert_close(a["act"][order[0]], b["act"][order[1]], atol=2e-2, rtol=2e-2)


def test_stream_order_resumes_anywhere_and_reads_only_what_it_deals(study, monkeypatch):
    raw, root = study
    live = stream(root, load_config(raw).activations)
    forward = []
    original = StreamSource._read
    monkeypatch.setattr(
        StreamSource,
        "_read",
        lambda self, blocks, c: forward.append(list(blocks)) or original(self, blocks, c),
    )
    full = one_epoch(live, 64, 160, ("doc_id", "pos"))
    ids = full["doc_id"] * 100 + full["pos"]
    for k in (1, 4, 9):
        forward.clear()
        batches = live.batches(64, ("doc_id", "pos"), seed=3, buffer_rows=160, start=k)
        got = next(batches)
        assert torch.equal(got["doc_id"] * 100 + got["pos"], ids[k * 64 : (k + 1) * 64]), k
        assert len(forward) <= 2  # the buffer holding batch k (and the next if it spans two)


def small_training(**changes) -> TrainingConfig:
    return TrainingConfig(
        **{
            "n_latents": 64,
            "seeds": [0, 1],
            "train_tokens": ROWS,  # one pass over the sample
            "batch_size": 96,
            "init_tokens": 96,
            "shuffle_tokens": 240,  # four forward passes per epoch
            "log_every": 1,
            "source": "stream",
            **changes,
        }
    )


def test_cache_and_stream_train_on_the_same_tokens_to_the_same_quality(study, tmp_path):
    """Same tokens, one SAE set from each source: the final FVU (last quarter of the curve, mean
    over the two seeds: a single seed's varies by ~8% at this scale) agrees within 5%."""
    raw, root = study
    cfg = load_config(raw).activations
    arch = {"topk": REGISTRY["topk"].Config(architecture="topk", k=4, lr=0.004)}
    files = {
        "cache": FileSource(ActivationFile(root / f"acts/layer{LAYER}/train.parquet")),
        "stream": stream(root, cfg),
    }
    fvu = {}
    for name, source in files.items():
        train_saes(
            small_training(train_tokens=8 * ROWS), arch, source, tmp_path / name, IDENTITY, {}
        )
        curves = [
            pq.read_table(tmp_path / name / f"topk/seed{seed}/training.parquet").to_pandas()
            for seed in (0, 1)
        ]
        fvu[name] = np.mean([c["fvu"].tail(len(c) // 4).mean() for c in curves])
    assert abs(fvu["stream"] - fvu["cache"]) <= 0.05 * fvu["cache"], fvu


def stream_command(
    root: Path, raw: dict, out: Path, resume: Path | None, training: dict
) -> list[str]:
    cfg = load_config(raw)
    settings = cfg.stage_settings("train")
    settings["training"] = {**settings["training"], "source": "stream", **training}
    settings["activations"] = {**cfg.stage_settings("activations")["activations"]}
    settings["model"] = cfg.model.model_dump(mode="json")
    command = [sys.executable, "-m", "saedynamics", "train", "--settings", json.dumps(settings)]
    command += ["--threads", "1", "--step", "2", "--layer", str(LAYER), "--out", str(out)]
    command += ["--checkpoint", str(root / "ckpt"), "--tokens", str(root / "tokens")]
    command += ["--eval", str(root / f"acts/layer{LAYER}/eval.parquet")]
    return command + (["--resume-dir", str(resume)] if resume else [])


def weights(out: Path) -> dict:
    return {
        str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("sae_weights.safetensors"))
    }


def test_a_killed_stream_job_resumes_bitwise(study, tmp_path):
    """Killed at three points (a step, a checkpoint's write, the SAEs' write), restarted after
    each: the SAEs are bitwise those of an uninterrupted run."""
    raw, root = study
    training = {
        "train_tokens": 2 * ROWS,
        "batch_size": 64,
        "init_tokens": 64,
        "shuffle_tokens": 200,
        "checkpoint_tokens": 4 * 64,
    }
    reference = tmp_path / "reference"
    done = run(stream_command(root, raw, reference, None, training))
    assert done.returncode == 0, done.stderr
    out, resume = tmp_path / "out", tmp_path / "resume"
    command = stream_command(root, raw, out, resume, training)
    n_steps = 2 * ROWS // 64
    resumed = []
    for point in ("7", "16:during-checkpoint", f"{n_steps}:during-output", None):
        job = run(command, point)
        said = re.search(r"resuming from .*: (\d+) batches done", job.stderr)
        resumed.append(int(said[1]) if said else 0)
        if point is None:
            assert job.returncode == 0, job.stderr
        else:
            assert job.returncode == -9, job.stderr
            assert not out.exists() or all(p.name.startswith(".") for p in out.iterdir())
    assert resumed == [0, 4, 12, 28]  # the last complete checkpoint before each kill
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert all(torch.equal(ours[name][k], theirs[name][k]) for k in ours[name]), name
    cfg = json.loads((out / "topk/seed0/cfg.json").read_text())["saedynamics"]
    assert cfg["activations"]["model"] and cfg["input_scale"] > 0
    assert cfg["activations_source"] == "stream"
    eval_norm = ActivationFile(root / f"acts/layer{LAYER}/eval.parquet").norm
    assert cfg["input_statistics"] == json.loads(json.dumps(eval_norm))  # from the eval cache


# ---- refused before training ----------------------------------------------------------------------


def test_a_sample_of_another_tokenizer_is_refused(study, tmp_path):
    raw, root = study
    manifest = json.loads((root / "tokens/manifest.json").read_text())
    manifest["vocab_size"] = 10**6
    (root / "tokens/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match="was not made with this model's tokenizer; rerun the tokens rule"
    ):
        stream(root, load_config(raw).activations)


def test_windows_longer_than_the_model_reads_are_refused(study):
    raw, root = study
    config = json.loads((root / "ckpt/config.json").read_text())
    config["max_position_embeddings"] = 8
    (root / "ckpt/config.json").write_text(json.dumps(config))
    with pytest.raises(
        DataError, match=r"tokens.context_length\) exceed the model's max_position_embeddings 8"
    ):
        stream(root, load_config(raw).activations)


def test_a_set_too_large_for_the_device_is_refused_before_training(
    study, tmp_path, monkeypatch, capsys
):
    raw, root = study
    monkeypatch.setattr("saedynamics.training.available_memory", lambda device: 10_000)
    out = tmp_path / "out"
    command = stream_command(root, raw, out, None, {"train_tokens": ROWS})
    message = cli_error(capsys, *command[3:])
    assert "need about" in message and "training.split_by_architecture" not in message
    assert "training.n_latents, training.batch_size or training.shuffle_tokens" in message
    assert not out.exists()


def test_stream_mode_needs_its_inputs(study, tmp_path, capsys):
    raw, root = study
    command = stream_command(root, raw, tmp_path / "out", None, {})
    i = command.index("--tokens")
    message = cli_error(capsys, *command[3:i], *command[i + 2 :])
    assert message == "error: training.source is 'stream': give --tokens"
