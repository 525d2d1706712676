"""The activations stage: one forward pass of a checkpoint over the token sample (hooks.py)
writes activations/step<N>/layer<L>/{train,eval}.parquet for every layer (activations.py), with
the extra columns an architecture of the study requires. The eval split runs the whole model (the
LM's eval loss is recorded); the train split stops after the deepest hooked layer if it can.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saedynamics.activations import ActivationWriter
from saedynamics.artifacts import MANIFEST, read_json
from saedynamics.config import ActivationsConfig
from saedynamics.errors import DataError
from saedynamics.hooks import LayerHooks, block_modules
from saedynamics.resources import (
    estimate_activation_bytes,
    human_bytes,
    out_of_memory_error,
    require_free_space,
    resolve_device,
)

log = logging.getLogger(__name__)


def cache_activations(
    cfg: ActivationsConfig,
    checkpoint_dir: Path,
    tokens_dir: Path,
    out_dir: Path,
    provenance: dict | None = None,
    model_cfg=None,
    splits=("train", "eval"),
) -> dict[str, float]:
    """Write out_dir/layer<L>/<split>.parquet for every layer and split; return LM eval stats
    (from the eval split, always cached). The checkpoint is verified against its manifest first
    (`checkpoints.load_model`). `model_cfg` (the study's), if given: the HF cache to fetch a corrupt
    file again through, and the d_model and layers the checkpoint must have."""
    from saedynamics.checkpoints import load_model
    from saedynamics.corpus import read_token_sample

    first = int(cfg.drop_first_position)

    def columns_of(split: str) -> tuple[str, ...]:  # measurements read the eval activations only
        return tuple(cfg.extra_columns) if split == "train" else ()

    # the token sample and the disk space first: cheap to check, where loading the model is not
    samples = {split: read_token_sample(tokens_dir, split) for split in splits}
    tokens = {split: windows[:, first:].size for split, (_, windows) in samples.items()}
    advice = (
        "free space on that disk, or lower tokens.train_sequences or cache fewer activations.layers"
    )
    need = 0
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # else load_model says why
        d_model = int(read_json(checkpoint_dir / "config.json")["hidden_size"])
        need = len(cfg.layers) * sum(
            estimate_activation_bytes(n, d_model, columns_of(split), cfg.row_group_rows)
            for split, n in tokens.items()
        )
        counts = " and ".join(f"{split} {n}" for split, n in tokens.items())
        what = (
            f"{out_dir}/layer<L>/{{{','.join(splits)}}}.parquet for layers {cfg.layers} "
            f"({counts} tokens per layer, d_model {d_model})"
        )
        require_free_space(out_dir, need, what, advice)
    device = resolve_device(cfg.device)
    dtype, cache_dir = getattr(torch, cfg.model_dtype), getattr(model_cfg, "cache_dir", None)
    model = load_model(checkpoint_dir, dtype=dtype, cache_dir=cache_dir)
    manifest, config = read_json(checkpoint_dir / MANIFEST), model.config
    found = (config.hidden_size, len(block_modules(model)))
    if model_cfg is not None and found != (model_cfg.d_model, model_cfg.num_layers):
        raise DataError(
            f"{checkpoint_dir}/config.json: the checkpoint has d_model {found[0]} and {found[1]} "
            f"layers, the config's model.d_model is {model_cfg.d_model} and model.num_layers "
            f"{model_cfg.num_layers}; fix the config or rerun the checkpoint rule"
        )
    model, hooks = model.to(device).requires_grad_(False), None
    if missing := [layer for layer in cfg.layers if layer >= found[1]]:
        raise DataError(
            f"{checkpoint_dir}: the model has {found[1]} layers; layers {missing} do not exist"
        )
    lm_stats, writers, started = {}, [], time.perf_counter()
    try:
        for split in splits:
            hooks = LayerHooks(model, cfg.layers, columns_of(split))
            doc_ids, windows = samples[split]
            ctx = windows.shape[1]
            if ctx > config.max_position_embeddings:
                raise DataError(
                    f"tokens.context_length {ctx} exceeds the model's max_position_embeddings "
                    f"{config.max_position_embeddings}"
                )
            metadata = {"model": manifest.get("repo_id") or "micro", "revision": manifest["revision"],
                        "commit": manifest.get("commit"), "step": manifest["step"], "split": split,
                        "dtype": "float16", "context_length": ctx, "first_position": first,
                        "vocab_size": config.vocab_size}  # fmt: skip
            by_layer = {}
            for layer in cfg.layers:
                hook = {"layer": layer, "hook": f"gpt_neox.layers.{layer}",
                        "hook_point": f"blocks.{layer}.hook_resid_post"}  # fmt: skip
                path = out_dir / f"layer{layer}" / f"{split}.parquet"
                by_layer[layer] = ActivationWriter(
                    path, config.hidden_size, metadata | hook, cfg.row_group_rows, columns_of(split),
                    provenance, f"this step's activations take about {human_bytes(need)} in all: "
                    f"{advice}, then rerun",
                )  # fmt: skip
                writers.append(by_layer[layer])
            loss_sum, loss_count = 0.0, 0
            starts = range(0, len(windows), cfg.batch_sequences)
            for start in tqdm(starts, desc=f"activations {split}", mininterval=5, unit="batch"):
                batch = windows[start : start + cfg.batch_sequences]
                ids = torch.from_numpy(batch.astype(np.int64)).to(device)
                acts, columns, nll = hooks.run(ids, logits=split == "eval")
                if nll is not None:
                    loss_sum, loss_count = loss_sum + nll.sum().item(), loss_count + nll.numel()
                pos = np.tile(np.arange(first, ctx, dtype=np.int32), len(batch))
                docs = np.repeat(doc_ids[start : start + len(batch)], ctx - first)
                toks = batch[:, first:].reshape(-1)
                for layer, writer in by_layer.items():
                    extra = {name: v[:, first:] for name, v in columns[layer].items()}
                    writer.append(docs, pos, toks, acts[layer][:, first:], **extra)
            if split == "eval":
                lm_stats = {"lm_eval_loss": loss_sum / loss_count, "lm_eval_tokens": loss_count}
            for writer in by_layer.values():
                writer.metadata.update(lm_stats)
                writer.close()
            hooks.remove()
    except BaseException as e:
        for writer in writers:  # all files or none: the ones already in place go too
            writer.discard()
        for folder in [out_dir / f"layer{layer}" for layer in cfg.layers] + [out_dir]:
            with contextlib.suppress(OSError):  # not empty, or not there: left alone
                folder.rmdir()
        if isinstance(e, torch.OutOfMemoryError):
            raise out_of_memory_error(
                e,
                f"{checkpoint_dir}: caching activations in batches of activations.batch_sequences "
                f"{cfg.batch_sequences}",
                "lower activations.batch_sequences. Nothing was written",
            ) from None
        raise
    finally:
        if hooks is not None:
            hooks.remove()
    seconds = time.perf_counter() - started
    n_tokens = sum(windows.size for _, windows in samples.values())
    log.info("step %s: %d tokens x %d layers in %.1f s (%.0f tokens/s); LM eval loss %.4f",
             manifest["step"], n_tokens, len(cfg.layers), seconds, n_tokens / seconds,
             lm_stats["lm_eval_loss"])  # fmt: skip
    return lm_stats
