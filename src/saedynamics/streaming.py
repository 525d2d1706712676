"""Activations streamed from the checkpoint (`training.source: stream`): no training cache on disk.

At the literature's scale (a single pass over hundreds of millions of tokens per SAE) the stored
thing is the token sample (corpus.py), not activations: a train job runs its checkpoint over the
sample's train windows on its own device, stopped after the hooked layer (hooks.py), and deals the
activations out through the same shuffled order as a cached file (sources.ShuffledSource): a block
is one forward batch of `activations.batch_sequences` windows, blocks are permuted per epoch and
read a shuffle buffer (`training.shuffle_tokens`) at a time, the buffer's rows permuted. Reading a
buffer is a forward pass over its windows; on resume the buffers before the position are skipped
unread and the current one is computed again, the same batches in the same order, so CPU runs
resume bitwise. The activations are kept as float16, as the cache stores them, and the input-scale
statistics come from the layer's eval cache (`norm`), which every measurement reads anyway.

Extra columns cost what they need: lm_entropy the rest of the forward pass and the unembedding,
lm_grad a backward pass through the layers above (benchmarks/README.md measures both). The source
also gives each row's `doc_id` and `pos` when asked (the tests compare what cache and stream deal).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saedynamics.activations import ActivationFile
from saedynamics.artifacts import MANIFEST, read_json
from saedynamics.config import EXTRA_COLUMNS, ActivationsConfig
from saedynamics.corpus import TokenSample
from saedynamics.errors import DataError
from saedynamics.hooks import LayerHooks, block_modules
from saedynamics.sources import ShuffledSource, describe


class StreamSource(ShuffledSource):
    """The checkpoint at `checkpoint_dir` run over the train split of the token sample at
    `tokens_dir`, hooked after `layer`; `eval_file`: that checkpoint's and layer's eval cache."""

    def __init__(
        self,
        checkpoint_dir: Path,
        tokens_dir: Path,
        layer: int,
        eval_file: ActivationFile,
        cfg: ActivationsConfig,
        device: torch.device,
        cache_dir: str | None = None,
    ):
        from saedynamics.checkpoints import load_model

        sample = TokenSample(tokens_dir)
        self.doc_ids, self.windows = sample.windows("train")
        config = read_json(Path(checkpoint_dir) / "config.json")  # checked before the model loads
        ctx, positions = sample.context_length, config.get("max_position_embeddings")
        if positions is not None and ctx > positions:
            raise DataError(
                f"{tokens_dir}: windows of {ctx} tokens (tokens.context_length) exceed the "
                f"model's max_position_embeddings {positions} ({checkpoint_dir}/config.json)"
            )
        vocab, model_vocab = sample.manifest.get("vocab_size"), config.get("vocab_size")
        if (
            vocab is None
            or model_vocab is None
            or vocab > model_vocab
            or self.windows.max() >= model_vocab
        ):
            raise DataError(
                f"{tokens_dir}: its tokenizer has {vocab} tokens (largest id in the sample "
                f"{self.windows.max()}), the model at {checkpoint_dir} {model_vocab}: the sample "
                "was not made with this model's tokenizer; rerun the tokens rule"
            )
        dtype = getattr(torch, cfg.model_dtype)
        self.model = load_model(checkpoint_dir, dtype=dtype, cache_dir=cache_dir)
        self.model = self.model.to(device).requires_grad_(False)
        if layer >= len(block_modules(self.model)):
            raise DataError(f"{checkpoint_dir}: the model has no layer {layer}")
        self.d_model, self.layer, self.cfg, self.device = (
            self.model.config.hidden_size,
            layer,
            cfg,
            device,
        )
        if eval_file.d_model != self.d_model or eval_file.metadata.get("layer") != layer:
            raise DataError(
                f"{eval_file.path}: holds layer {eval_file.metadata.get('layer')} of d_model "
                f"{eval_file.d_model}, not layer {layer} of this checkpoint (d_model "
                f"{self.d_model}); rerun the activations rule"
            )
        self.first = int(cfg.drop_first_position)
        per_window = ctx - self.first
        n, b = len(self.windows), cfg.batch_sequences  # a block: one forward batch of windows
        self.block_rows = [min(b, n - i) * per_window for i in range(0, n, b)]
        self.norm = eval_file.norm
        self.description = describe(eval_file.metadata, "stream")
        self._fingerprint = {
            "checkpoint": read_json(Path(checkpoint_dir) / MANIFEST).get("files"),
            "tokens": {k: sample.manifest.get(k) for k in ("shards", "seed", "tokenizer_files")},
            "layer": layer,
            "activations": cfg.model_dump(
                mode="json", include={"drop_first_position", "model_dtype", "batch_sequences"}
            ),
        }
        self._params = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _read(self, blocks, columns) -> dict[str, torch.Tensor]:
        """The forward passes of `blocks`, one batch each, in that order."""
        extras = [c for c in columns if c in EXTRA_COLUMNS]
        hooks = LayerHooks(self.model, [self.layer], extras)
        out: dict[str, list] = {c: [] for c in columns}
        b = self.cfg.batch_sequences
        try:
            for block in blocks:
                ids = torch.from_numpy(self.windows[block * b : (block + 1) * b].astype(np.int64))
                acts, per_layer, _ = hooks.run(ids.to(self.device), logits=False)
                values = {"act": acts[self.layer].to(torch.float16), **per_layer[self.layer]}
                for name in columns:
                    if name in ("doc_id", "pos"):
                        out[name].append(self._positions(block, name))
                    else:
                        value = values[name][:, self.first :]
                        out[name].append(
                            value.reshape(-1, self.d_model)
                            if value.dim() == 3
                            else value.reshape(-1)
                        )
        finally:
            hooks.remove()
        return {c: torch.cat(v) for c, v in out.items()}

    def _positions(self, block: int, name: str) -> torch.Tensor:
        docs = self.doc_ids[
            block * self.cfg.batch_sequences : (block + 1) * self.cfg.batch_sequences
        ]
        ctx = self.windows.shape[1]
        if name == "doc_id":
            return torch.from_numpy(np.repeat(docs, ctx - self.first)).to(self.device)
        return torch.arange(self.first, ctx, device=self.device).repeat(len(docs))

    def fingerprint(self) -> dict:
        return json.loads(json.dumps(self._fingerprint))

    def memory_bytes(self, columns, buffer_rows: int) -> int:
        """The shuffle buffer, the model, and one forward batch's activations (~16 [tokens,
        d_model] float32 tensors per layer run, and the logits where an extra column needs them)."""
        tokens = self.cfg.batch_sequences * self.windows.shape[1]
        layers = (
            len(block_modules(self.model)) if set(columns) & set(EXTRA_COLUMNS) else self.layer + 1
        )
        forward = tokens * 4 * (16 * self.d_model * layers)
        if set(columns) & set(EXTRA_COLUMNS):
            forward += (
                tokens * 4 * 3 * self.model.config.vocab_size
            )  # logits, log-softmax, probabilities
        row = {
            "act": 2 * self.d_model,
            "lm_grad": 4 * self.d_model,
            "lm_entropy": 4,
            "doc_id": 8,
            "pos": 8,
        }
        rows = min(sum(self.block_rows), max(buffer_rows, max(self.block_rows)))
        return rows * sum(row[c] for c in columns) + self._params + forward
