"""Activations: hooks -> Parquet shards, and the streaming reader that feeds training.

One forward pass per checkpoint writes `activations/step<N>/layer<L>/{train,eval}.parquet` for every
configured layer. Schema: doc_id int32, pos int32, token_id int32, act fixed_size_list<float16>[d],
plus optional extra columns (EXTRA_COLUMNS) when an architecture needs them.
The hooked activation is the residual stream after block L, the output of `gpt_neox.layers[L]`
(= TransformerLens blocks.L.hook_resid_post). `output_hidden_states` is not used: its last entry is
after the final LayerNorm, not the raw residual (spec/measurements.md section 4.3).

File metadata (key "saedynamics", JSON) holds model, revision, commit, layer, hook, dtype, and the
norm statistics of the stored values (E|x|, E|x|^2, E|x - E x|^2) from which the trainer takes its
input scale; the eval files also carry the LM's own eval loss at this checkpoint.

The reader streams batches in a seeded shuffled order: row groups in a random order, a few at a
time in a buffer whose rows are shuffled, so memory stays bounded by the buffer, never the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from saedynamics.artifacts import atomic_file, read_json
from saedynamics.config import EXTRA_COLUMNS, ActivationsConfig
from saedynamics.errors import DataError

log = logging.getLogger(__name__)

METADATA_KEY = b"saedynamics"
FORMAT_VERSION = 1  # bump when the file layout or its metadata changes


def schema(d_model: int, extra_columns=()) -> pa.Schema:
    fields = [
        ("doc_id", pa.int32()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("act", pa.list_(pa.float16(), d_model)),
    ]
    for name in extra_columns:
        vector = EXTRA_COLUMNS[name]["vector"]
        fields.append((name, pa.list_(pa.float32(), d_model) if vector else pa.float32()))
    return pa.schema(fields)


class ActivationWriter:
    """Append rows; written in row groups of `row_group_rows`; renamed into place on `close()`."""

    def __init__(
        self, path: Path, d_model: int, metadata: dict, row_group_rows: int, extra_columns=()
    ):
        self.path, self.d_model = Path(path), d_model
        self.metadata = {"format_version": FORMAT_VERSION, **metadata}
        self.row_group_rows = row_group_rows
        self.schema = schema(d_model, extra_columns)
        self._atomic = atomic_file(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._buffer: dict[str, list[np.ndarray]] = {name: [] for name in self.schema.names}
        self._buffered = 0
        self.n_rows = 0
        self._norm_sum = 0.0
        self._sq_norm_sum = 0.0
        self._sum = torch.zeros(d_model, dtype=torch.float64)
        self._open = True

    def append(
        self,
        doc_id: np.ndarray,
        pos: np.ndarray,
        token_id: np.ndarray,
        act: torch.Tensor,
        **extras: torch.Tensor,
    ) -> None:
        half = act.detach().to("cpu", torch.float16)
        if not torch.isfinite(half).all():
            raise DataError(
                f"{self.path}: activations overflow float16 (|x| > 65504) or are not finite; "
                "the checkpoint or model_dtype is likely broken"
            )
        stored = half.double()  # statistics of exactly what the reader will see
        norms_sq = stored.pow(2).sum(dim=1)
        self._norm_sum += norms_sq.sqrt().sum().item()
        self._sq_norm_sum += norms_sq.sum().item()
        self._sum += stored.sum(dim=0)
        columns = {"doc_id": doc_id, "pos": pos, "token_id": token_id, "act": half.numpy()}
        columns |= {k: v.detach().to("cpu", torch.float32).numpy() for k, v in extras.items()}
        if set(columns) != set(self._buffer):
            raise ValueError(
                f"append() got columns {sorted(columns)}, the file has {self.schema.names}"
            )
        for name, values in columns.items():
            self._buffer[name].append(values)
        self._buffered += len(doc_id)
        while self._buffered >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, n: int) -> None:
        arrays = []
        for field in self.schema:
            values = np.concatenate(self._buffer[field.name])
            self._buffer[field.name] = [values[n:]] if len(values) > n else []
            head = values[:n]
            if isinstance(field.type, pa.FixedSizeListType):
                arrays.append(
                    pa.FixedSizeListArray.from_arrays(pa.array(head.reshape(-1)), self.d_model)
                )
            else:
                arrays.append(pa.array(head))
        self._writer.write_table(pa.table(arrays, schema=self.schema))
        self._buffered -= n
        self.n_rows += n

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        if self.n_rows == 0:
            raise DataError(f"{self.path}: no activations to write")
        mean = self._sum / self.n_rows
        self.metadata["norm"] = {
            "n_rows": self.n_rows,
            "mean_norm": self._norm_sum / self.n_rows,  # E|x|
            "mean_squared_norm": self._sq_norm_sum / self.n_rows,  # E|x|^2
            "centred_mean_squared_norm": self._sq_norm_sum / self.n_rows - mean.pow(2).sum().item(),
        }
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(self.metadata)})
        self._writer.close()
        self._open = False
        self._atomic.__exit__(None, None, None)
        return self.metadata

    def abort(self) -> None:
        """Discard everything written so far (no-op once closed)."""
        if self._open:
            self._open = False
            self._writer.close()
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


class ActivationFile:
    """Read access to one activation Parquet file; fails with the file named if it is not one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
            meta = self._file.metadata.metadata or {}  # file footer key-value metadata
            self.metadata = json.loads(meta[METADATA_KEY])
        except FileNotFoundError:
            raise DataError(
                f"{self.path}: no such activation file; run the activations rule"
            ) from None
        except (OSError, pa.ArrowInvalid, KeyError, ValueError) as e:
            raise DataError(
                f"{self.path}: not a readable activation file ({type(e).__name__}: {e}); "
                "delete it and rerun the activations rule"
            ) from None
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: written in activation format {self.metadata.get('format_version')}, "
                f"this saedynamics reads format {FORMAT_VERSION}; rerun the activations rule "
                "(snakemake --forcerun activations)"
            )
        names = self._file.schema_arrow.names
        act = self._file.schema_arrow.field("act").type if "act" in names else None
        if not isinstance(act, pa.FixedSizeListType) or act.value_type != pa.float16():
            raise DataError(
                f"{self.path}: column 'act' must be fixed_size_list<float16>, found {act}"
            )
        self.d_model = act.list_size
        self.n_rows = self._file.metadata.num_rows
        self.num_row_groups = self._file.num_row_groups
        self.columns = names

    def input_scale(self, scheme: str) -> float:
        """The factor the trainer multiplies inputs by (see TrainingConfig.input_scaling)."""
        norm = self.metadata["norm"]
        if scheme == "expected_norm":  # E|x| = sqrt(d)  (SAELens expected_average_only_in)
            return self.d_model**0.5 / norm["mean_norm"]
        if scheme == "centred":  # E|x - E x|^2 = d: unit variance per dimension on average
            return (self.d_model / norm["centred_mean_squared_norm"]) ** 0.5
        return 1.0

    def _check_columns(self, columns) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(
                f"{self.path}: has no column(s) {missing}, which an architecture of this study needs; "
                "rerun the activations rule (snakemake --forcerun activations)"
            )

    def read_row_group(self, i: int, columns=("act",)) -> dict[str, np.ndarray]:
        try:
            table = self._file.read_row_group(i, columns=list(columns))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{self.path}: row group {i} is unreadable ({e}); the file is corrupt"
            ) from None
        out = {}
        for name in columns:
            col = table.column(name).combine_chunks()
            if isinstance(col.type, pa.FixedSizeListType):
                out[name] = col.values.to_numpy(zero_copy_only=False).reshape(
                    -1, col.type.list_size
                )
            else:
                out[name] = col.to_numpy()
        return out

    def batches(self, batch_size: int, columns=("act",)) -> Iterator[dict[str, np.ndarray]]:
        """All rows once, in file order, as dicts of arrays (the last batch may be smaller)."""
        self._check_columns(columns)
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0
        for i in range(self.num_row_groups):
            pending.append(self.read_row_group(i, columns))
            n_pending += len(pending[-1][columns[0]])
            if n_pending >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in columns}
                n_full = n_pending // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    yield {k: v[start : start + batch_size] for k, v in merged.items()}
                pending = [{k: v[n_full:] for k, v in merged.items()}]
                n_pending -= n_full
        if n_pending:
            yield {k: np.concatenate([p[k] for p in pending]) for k in columns}

    def tensors(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All activations once, in file order, as float32 tensors [batch, d_model]."""
        for b in self.batches(batch_size):
            yield torch.from_numpy(b["act"]).float()

    def shuffled(
        self, batch_size: int, seed: int, columns=("act",), buffer_row_groups: int = 4
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches {column: float32 tensor} in a seeded shuffled order, epoch after epoch."""
        self._check_columns(columns)
        rng = np.random.default_rng(seed)
        leftover: dict[str, np.ndarray] | None = None
        while True:
            order = rng.permutation(self.num_row_groups)
            for start in range(0, len(order), buffer_row_groups):
                parts = [
                    self.read_row_group(i, columns)
                    for i in order[start : start + buffer_row_groups]
                ]
                if leftover is not None:
                    parts.insert(0, leftover)
                rows = {c: np.concatenate([p[c] for p in parts]) for c in columns}
                perm = rng.permutation(len(rows[columns[0]]))
                rows = {c: v[perm] for c, v in rows.items()}
                n_full = len(perm) // batch_size * batch_size
                for b in range(0, n_full, batch_size):
                    yield {
                        c: torch.from_numpy(v[b : b + batch_size]).float() for c, v in rows.items()
                    }
                leftover = {c: v[n_full:] for c, v in rows.items()}


# ---- caching ----------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict:
    """The saedynamics metadata of an activation file, without reading its rows."""
    return json.loads(pq.read_metadata(path).metadata[METADATA_KEY])


def _block_modules(model) -> list:
    """The transformer blocks of a causal LM (GPT-NeoX; GPT-2 and Llama-style as a courtesy)."""
    for path in ("gpt_neox.layers", "transformer.h", "model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise DataError(f"cannot find the transformer blocks of a {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed for the train split."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' was configured but no CUDA device is available")
    return torch.device(device)


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position [batch, seq]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def cache_activations(
    cfg: ActivationsConfig, checkpoint_dir: Path, tokens_parquet: Path, out_dir: Path
) -> dict[str, float]:
    """Write out_dir/layer<L>/{train,eval}.parquet for every configured layer; return LM eval stats.

    Extra columns (cfg.extra_columns), per stored token:
      lm_entropy  entropy of the checkpoint's next-token distribution at the position (nats);
      lm_grad     gradient of the summed next-token loss of the window w.r.t. the hooked
                  activation (all later positions' losses, through every later layer).
    """
    from transformers import AutoModelForCausalLM

    from saedynamics.corpus import read_token_sample

    manifest = read_json(checkpoint_dir / "manifest.json")
    device = resolve_device(cfg.device)
    model = (
        AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, dtype=getattr(torch, cfg.model_dtype), trust_remote_code=False
        )
        .to(device)
        .eval()
    )
    model.requires_grad_(False)
    blocks = _block_modules(model)
    missing = [layer for layer in cfg.layers if layer >= len(blocks)]
    if missing:
        raise DataError(
            f"{checkpoint_dir}: the model has {len(blocks)} layers; layers {missing} do not exist"
        )
    d_model = model.config.hidden_size
    first = 1 if cfg.drop_first_position else 0
    extras = tuple(cfg.extra_columns)
    want_grad = "lm_grad" in extras

    captured: dict[int, torch.Tensor] = {}
    stop_after: list[int | None] = [None]

    def hook(layer):
        def fn(module, args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop_after[0] == layer:
                raise _StopForward

        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in cfg.layers]
    if want_grad:  # a leaf at the embeddings, so that autograd reaches every hooked layer
        handles.append(
            model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: output.detach().requires_grad_(True)
            )
        )
    lm_stats: dict[str, float] = {}
    started, n_tokens = time.perf_counter(), 0
    try:
        for split in ("train", "eval"):
            doc_ids, windows = read_token_sample(tokens_parquet, split)
            ctx = windows.shape[1]
            if ctx > model.config.max_position_embeddings:
                raise DataError(
                    f"tokens.context_length {ctx} exceeds the model's max_position_embeddings "
                    f"{model.config.max_position_embeddings}"
                )
            writers = {
                layer: ActivationWriter(
                    out_dir / f"layer{layer}" / f"{split}.parquet",
                    d_model,
                    {
                        "model": manifest.get("repo_id") or "micro",
                        "revision": manifest["revision"],
                        "commit": manifest.get("commit"),
                        "step": manifest["step"],
                        "layer": layer,
                        "hook": f"gpt_neox.layers.{layer}",
                        "hook_point": f"blocks.{layer}.hook_resid_post",
                        "split": split,
                        "dtype": "float16",
                        "context_length": ctx,
                        "first_position": first,
                        "vocab_size": model.config.vocab_size,
                    },
                    cfg.row_group_rows,
                    extras,
                )
                for layer in cfg.layers
            }
            # logits are needed for the eval loss and the extra columns; else stop at the last layer
            stop_after[0] = None if split == "eval" or extras else max(cfg.layers)
            loss_sum, loss_count = 0.0, 0
            try:
                for start in tqdm(
                    range(0, len(windows), cfg.batch_sequences),
                    desc=f"activations {split}",
                    mininterval=5,
                    unit="batch",
                ):
                    ids = torch.from_numpy(
                        windows[start : start + cfg.batch_sequences].astype(np.int64)
                    ).to(device)
                    with torch.set_grad_enabled(want_grad):
                        try:
                            out = model(input_ids=ids)
                        except _StopForward:
                            out = None
                    columns = {}
                    if out is not None:
                        logp = out.logits[:, :-1].float().log_softmax(-1)
                        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
                        loss_sum += nll.sum().item()
                        loss_count += nll.numel()
                        if "lm_entropy" in extras:
                            columns["lm_entropy"] = next_token_entropy(out.logits.detach())
                        if want_grad:
                            grads = torch.autograd.grad(
                                nll.sum(), [captured[layer] for layer in cfg.layers]
                            )
                            grad_of = dict(zip(cfg.layers, grads, strict=True))
                    b = len(ids)
                    n_tokens += ids.numel()
                    pos = np.tile(np.arange(first, ctx, dtype=np.int32), b)
                    docs = np.repeat(doc_ids[start : start + b].astype(np.int32), ctx - first)
                    toks = windows[start : start + b, first:].reshape(-1).astype(np.int32)
                    for layer, writer in writers.items():
                        acts = captured[layer].detach()[:, first:].reshape(-1, d_model)
                        per_layer = dict(columns)
                        if want_grad:
                            per_layer["lm_grad"] = grad_of[layer][:, first:].reshape(-1, d_model)
                        if "lm_entropy" in per_layer:
                            per_layer["lm_entropy"] = per_layer["lm_entropy"][:, first:].reshape(-1)
                        writer.append(docs, pos, toks, acts, **per_layer)
                    captured.clear()
                if split == "eval":
                    lm_stats = {"lm_eval_loss": loss_sum / loss_count, "lm_eval_tokens": loss_count}
                for writer in writers.values():
                    writer.metadata.update(lm_stats if split == "eval" else {})
                    writer.close()
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                raise
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - started
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
