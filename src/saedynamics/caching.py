"""The activations stage: one forward pass of a checkpoint over the token sample writes
activations/step<N>/layer<L>/{train,eval}.parquet for every configured layer (activations.py).

The hooked activation is the residual stream after block L, the output of `gpt_neox.layers[L]`
(= TransformerLens blocks.L.hook_resid_post); not `output_hidden_states`, whose last entry is taken
after the final LayerNorm (spec/measurements.md section 4.3). Extra columns, per token, only when an
architecture of the study requires them (config.EXTRA_COLUMNS):
  lm_entropy  entropy of the checkpoint's next-token distribution at the position (nats);
  lm_grad     gradient of the window's summed next-token loss w.r.t. the hooked activation (all
              later positions' losses, through every later layer): a backward pass.
Without them the train split stops the forward pass after the deepest hooked layer.
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
from saedynamics.resources import (
    estimate_activation_bytes,
    human_bytes,
    out_of_memory_error,
    require_free_space,
    resolve_device,
)

log = logging.getLogger(__name__)


def block_modules(model) -> list:
    """The transformer blocks of a causal LM (GPT-NeoX; GPT-2 and Llama-style as a courtesy)."""
    for path in ("gpt_neox.layers", "transformer.h", "model.layers"):
        obj = model
        with contextlib.suppress(AttributeError):
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
    raise DataError(f"cannot find the transformer blocks of a {type(model).__name__}")


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position [batch, seq]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class _Stop(Exception):
    """Raised by the deepest hook when nothing after it is needed."""


class LayerHooks:
    """Captures the residual stream after `layers` of `model` during a forward pass (`run`)."""

    def __init__(self, model, layers: list[int], extras=()):
        self.model, self.layers, self.extras = model, layers, tuple(extras)
        blocks = block_modules(model)
        if missing := [layer for layer in layers if layer >= len(blocks)]:
            raise DataError(f"the model has {len(blocks)} layers; layers {missing} do not exist")
        self.captured: dict[int, torch.Tensor] = {}
        self.stop_after: int | None = None
        self.handles = [blocks[layer].register_forward_hook(self._hook(layer)) for layer in layers]
        if "lm_grad" in self.extras:  # a leaf at the embeddings: autograd reaches every layer
            embeddings = model.get_input_embeddings()
            self.handles.append(
                embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
            )

    def _hook(self, layer: int):
        def capture(module, args, output):
            self.captured[layer] = output[0] if isinstance(output, tuple) else output
            if self.stop_after == layer:
                raise _Stop

        return capture

    def run(self, ids: torch.Tensor, logits: bool) -> tuple[dict, dict, torch.Tensor | None]:
        """({layer: activations [b, seq, d]}, {layer: extra columns}, next-token losses [b, seq-1]
        or None). `logits`: run the whole model even if no extra column needs it."""
        self.captured = {}
        self.stop_after = None if logits or self.extras else max(self.layers)
        with torch.set_grad_enabled("lm_grad" in self.extras):
            try:
                out = self.model(input_ids=ids)
            except _Stop:
                return dict(self.captured), {layer: {} for layer in self.layers}, None
        logp = out.logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        columns = {}
        if "lm_entropy" in self.extras:
            columns["lm_entropy"] = next_token_entropy(out.logits.detach())
        per_layer = {layer: dict(columns) for layer in self.layers}
        if "lm_grad" in self.extras:
            grads = torch.autograd.grad(nll.sum(), [self.captured[layer] for layer in self.layers])
            for layer, grad in zip(self.layers, grads, strict=True):
                per_layer[layer]["lm_grad"] = grad
        return {k: v.detach() for k, v in self.captured.items()}, per_layer, nll.detach()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def cache_activations(
    cfg: ActivationsConfig,
    checkpoint_dir: Path,
    tokens_parquet: Path,
    out_dir: Path,
    provenance: dict | None = None,
    model_cfg=None,
) -> dict[str, float]:
    """Write out_dir/layer<L>/{train,eval}.parquet for every configured layer; return LM eval stats.

    The checkpoint is verified against its manifest first (`checkpoints.load_model`). `model_cfg`
    (the study's model config), if given: the HF cache to fetch a corrupt file again through, and
    the d_model and number of layers the checkpoint must have. All files or none are left.
    """
    from saedynamics.checkpoints import load_model
    from saedynamics.corpus import read_token_sample

    first = 1 if cfg.drop_first_position else 0
    extras = tuple(cfg.extra_columns)
    # the token sample and the disk space first: cheap to check, where loading the model is not
    samples = {split: read_token_sample(tokens_parquet, split) for split in ("train", "eval")}
    tokens = {split: windows[:, first:].size for split, (_, windows) in samples.items()}
    advice = (
        "free space on that disk, or lower tokens.train_sequences or cache fewer activations.layers"
    )
    need = 0
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # else load_model says why
        d_model = int(read_json(checkpoint_dir / "config.json")["hidden_size"])
        need = len(cfg.layers) * sum(
            estimate_activation_bytes(n, d_model, extras, cfg.row_group_rows)
            for n in tokens.values()
        )
        what = (
            f"{out_dir}/layer<L>/{{train,eval}}.parquet for layers {cfg.layers} (train "
            f"{tokens['train']} and eval {tokens['eval']} tokens per layer, d_model {d_model})"
        )
        require_free_space(out_dir, need, what, advice)
    device = resolve_device(cfg.device)
    model = load_model(
        checkpoint_dir,
        dtype=getattr(torch, cfg.model_dtype),
        cache_dir=getattr(model_cfg, "cache_dir", None),
    )
    manifest, config = read_json(checkpoint_dir / MANIFEST), model.config
    found = (config.hidden_size, len(block_modules(model)))
    if model_cfg is not None and found != (model_cfg.d_model, model_cfg.num_layers):
        raise DataError(
            f"{checkpoint_dir}/config.json: the checkpoint has d_model {found[0]} and {found[1]} "
            f"layers, the config's model.d_model is {model_cfg.d_model} and model.num_layers "
            f"{model_cfg.num_layers}; fix the config or rerun the checkpoint rule"
        )
    try:
        hooks = LayerHooks(model.to(device).requires_grad_(False), cfg.layers, extras)
    except DataError as e:
        raise DataError(f"{checkpoint_dir}: {e}") from None
    lm_stats, writers, started = {}, [], time.perf_counter()
    try:
        for split in ("train", "eval"):
            doc_ids, windows = samples[split]
            ctx = windows.shape[1]
            if ctx > config.max_position_embeddings:
                raise DataError(
                    f"tokens.context_length {ctx} exceeds the model's max_position_embeddings "
                    f"{config.max_position_embeddings}"
                )
            metadata = {
                "model": manifest.get("repo_id") or "micro",
                "revision": manifest["revision"],
                "commit": manifest.get("commit"),
                "step": manifest["step"],
                "split": split,
                "dtype": "float16",
                "context_length": ctx,
                "first_position": first,
                "vocab_size": config.vocab_size,
            }
            by_layer = {}
            for layer in cfg.layers:
                hook = {"layer": layer, "hook": f"gpt_neox.layers.{layer}",
                        "hook_point": f"blocks.{layer}.hook_resid_post"}  # fmt: skip
                path = out_dir / f"layer{layer}" / f"{split}.parquet"
                by_layer[layer] = ActivationWriter(
                    path, config.hidden_size, metadata | hook, cfg.row_group_rows, extras,
                    provenance, f"this step's activations take about {human_bytes(need)} in all: "
                    f"{advice}, then rerun",
                )  # fmt: skip
                writers.append(by_layer[layer])
            loss_sum, loss_count = 0.0, 0
            starts = range(0, len(windows), cfg.batch_sequences)
            for start in tqdm(starts, desc=f"activations {split}", mininterval=5, unit="batch"):
                ids = torch.from_numpy(
                    windows[start : start + cfg.batch_sequences].astype(np.int64)
                )
                acts, columns, nll = hooks.run(ids.to(device), logits=split == "eval")
                if nll is not None:
                    loss_sum, loss_count = loss_sum + nll.sum().item(), loss_count + nll.numel()
                pos = np.tile(np.arange(first, ctx, dtype=np.int32), len(ids))
                docs = np.repeat(doc_ids[start : start + len(ids)], ctx - first)
                toks = windows[start : start + len(ids), first:].reshape(-1)
                for layer, writer in by_layer.items():
                    extra = {name: v[:, first:] for name, v in columns[layer].items()}
                    writer.append(docs, pos, toks, acts[layer][:, first:], **extra)
            if split == "eval":
                lm_stats = {"lm_eval_loss": loss_sum / loss_count, "lm_eval_tokens": loss_count}
            for writer in by_layer.values():
                writer.metadata.update(lm_stats)
                writer.close()
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
        hooks.remove()
    seconds = time.perf_counter() - started
    n_tokens = sum(windows.size for _, windows in samples.values())
    log.info(
        "step %s: %d tokens x %d layers in %.1f s (%.0f tokens/s); LM eval loss %.4f",
        manifest["step"],
        n_tokens,
        len(cfg.layers),
        seconds,
        n_tokens / seconds,
        lm_stats["lm_eval_loss"],
    )
    return lm_stats
