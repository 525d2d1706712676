"""The micro suite: a tiny GPT-NeoX (`transformers`; parallel residual and partial rotary, as in
Pythia) trained here on the study's token sample, and checkpointed on Pythia's schedule in
miniature (`MicroModelConfig.schedule()`).

Its checkpoints follow the contract of `checkpoints` (`checkpoints/step<N>/`: a Hugging Face model
directory plus manifest.json, with `source: micro`), so every later stage loads them with
`checkpoints.load_model`, as it loads the Hub's. A changed file of one cannot be fetched again:
only retraining (the micro_lm rule) rebuilds it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from saedynamics.artifacts import (
    MANIFEST,
    atomic_directory,
    read_json,
    sha256_file,
    write_json,
    write_parquet,
)
from saedynamics.checkpoints import weights_sha256
from saedynamics.config import MicroModelConfig
from saedynamics.corpus import load_tokenizer, read_token_sample

log = logging.getLogger(__name__)


def micro_model_config(model: MicroModelConfig, vocab_size: int, context_length: int, eos: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=model.d_model,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.intermediate_size or 4 * model.d_model,
        max_position_embeddings=context_length,
        rotary_pct=model.rotary_pct,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
    )


def lr_at(model: MicroModelConfig, step: int) -> float:
    """Pythia's schedule: linear warm-up, then cosine decay to min_lr_fraction * lr."""
    warmup = max(1, round(model.warmup_fraction * model.train_steps))
    if step < warmup:
        return model.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, model.train_steps - warmup)
    floor = model.min_lr_fraction
    return model.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_micro_suite(
    model: MicroModelConfig,
    tokens_parquet: Path,
    tokenizer_dir: Path,
    out_root: Path,
    curve: Path,
    provenance: dict | None = None,
) -> list[dict]:
    """Train the micro LM and save `out_root/step<N>/` at every step of `model.schedule()`.

    `provenance` goes into every checkpoint's manifest.json and into the loss curve `curve`.
    """
    from transformers import GPTNeoXForCausalLM

    _, windows = read_token_sample(tokens_parquet, "train")
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(model.seed)
    lm = GPTNeoXForCausalLM(
        micro_model_config(model, len(tokenizer), windows.shape[1], tokenizer.eos_token_id)
    )
    decay = [p for n, p in lm.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in lm.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": model.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=model.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = torch.from_numpy(windows.astype(np.int64))
    order_rng = torch.Generator().manual_seed(model.seed)
    order, cursor = torch.randperm(len(data), generator=order_rng), 0
    schedule = set(model.schedule())
    manifests, rows = [], []
    tokens_per_step = model.batch_size * data.shape[1]

    def save(step: int, loss: float | None) -> None:
        out = out_root / f"step{step}"
        with atomic_directory(out) as tmp:
            lm.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            manifest = {
                "source": "micro",
                "repo_id": None,
                "revision": f"step{step}",
                "step": step,
                "commit": None,
                "files": files,
                "weights_sha256": weights_sha256(files),
                "duplicate_of": None,
                "tokens_seen": step * tokens_per_step,
                "train_loss": loss,
            }
            for other in manifests:
                if other["weights_sha256"] == manifest["weights_sha256"]:
                    manifest["duplicate_of"] = other["step"]
                    break
            write_json(tmp / MANIFEST, manifest, provenance)
        manifests.append(read_json(out / MANIFEST))

    save(0, None)
    lm.train()
    started = time.perf_counter()
    for step in tqdm(range(1, model.train_steps + 1), desc="micro LM", mininterval=5, unit="step"):
        if cursor + model.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=order_rng), 0
        batch = data[order[cursor : cursor + model.batch_size]]
        cursor += model.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(model, step - 1)
        loss = lm(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        rows.append(
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": loss.item(),
                "lr": lr_at(model, step - 1),
            }
        )
        if step in schedule:
            lm.eval()
            save(step, loss.item())
            lm.train()
            log.info("micro LM step %d: train loss %.3f", step, loss.item())
    seconds = time.perf_counter() - started
    log.info(
        "micro LM: %d steps, %d tokens in %.1f s (%.0f tokens/s)",
        model.train_steps,
        model.train_steps * tokens_per_step,
        seconds,
        model.train_steps * tokens_per_step / seconds,
    )
    write_parquet(curve, pa.Table.from_pylist(rows), provenance)
    return manifests
