"""Language-model checkpoints across training, from two sources behind one contract.

Each checkpoint is a Hugging Face model directory `checkpoints/step<N>/` (config.json, weights as
safetensors, tokenizer files) plus `manifest.json`: where it came from (repo id, revision, resolved
commit), the sha256 of every file, and `duplicate_of` when its weights are byte-identical to an
earlier step's (Pythia has such steps: EleutherAI/pythia#83, #195, #206).

- `hub`: `huggingface_hub.snapshot_download` at revision `step<N>` into the HF cache, then a copy.
  Old Pythia revisions ship only `pytorch_model.bin`; it is read with `torch.load(weights_only=True)`
  (no code runs) and converted, so downstream stages only ever see safetensors.
- `micro`: a tiny GPT-NeoX (`transformers`, parallel residual and partial rotary as in Pythia)
  trained here on the study's token sample, checkpointed on Pythia's schedule in miniature.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import shutil
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
    write_safetensors,
)
from saedynamics.config import HubModelConfig, MicroModelConfig
from saedynamics.errors import DataError

log = logging.getLogger(__name__)

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
PICKLED = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


# ---- hub ------------------------------------------------------------------------------------------


def _snapshot(repo_id: str, revision: str, patterns: list[str], cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise DataError(
            f"cannot get {repo_id} at revision {revision!r} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e})"
        ) from e


def download_tokenizer(model: HubModelConfig, out_dir: Path) -> dict:
    """Copy the tokenizer files of `model.tokenizer_revision` into `out_dir`; return their origin."""
    snapshot = _snapshot(model.repo_id, model.tokenizer_revision, TOKENIZER_FILES, model.cache_dir)
    copied = {}
    for name in TOKENIZER_FILES:
        if (snapshot / name).exists():
            shutil.copy2(snapshot / name, out_dir / name)
            copied[name] = sha256_file(out_dir / name)
    if "tokenizer.json" not in copied:
        raise DataError(f"{model.repo_id}@{model.tokenizer_revision} has no tokenizer.json")
    return {
        "repo_id": model.repo_id,
        "revision": model.tokenizer_revision,
        "commit": snapshot.name,
        "files": copied,
    }


def download_checkpoint(
    model: HubModelConfig,
    step: int,
    out_dir: Path,
    earlier: list[Path],
    provenance: dict | None = None,
) -> dict:
    """Fetch one revision, write `out_dir` (model dir + manifest.json) atomically; return the manifest.

    `earlier`: manifests of steps fetched before this one, to detect byte-identical weights.
    `provenance` goes into the manifest (and into the weights where we convert them).
    """
    revision = model.revision.format(step=step)
    snapshot = _snapshot(
        model.repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + SAFETENSORS, model.cache_dir
    )
    weights = sorted(snapshot.glob("model*.safetensors"))
    if not weights:  # old revisions: pickled weights only, read safely and converted below
        snapshot = _snapshot(
            model.repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + PICKLED, model.cache_dir
        )
        weights = sorted(snapshot.glob("pytorch_model*.bin"))
    if not (snapshot / "config.json").exists() or not weights:
        raise DataError(
            f"{model.repo_id}@{revision} (commit {snapshot.name}) has no config.json or weights"
        )

    patterns = (
        CONFIG_FILES + TOKENIZER_FILES + (PICKLED if weights[0].suffix == ".bin" else SAFETENSORS)
    )
    source_files = {
        p.name: sha256_file(p)
        for p in sorted(snapshot.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    }
    with atomic_directory(out_dir) as tmp:
        for name in source_files:
            if not name.startswith("pytorch_model"):
                shutil.copy2(snapshot / name, tmp / name)
        if weights[0].suffix == ".bin":
            _convert_pickled_weights(weights, tmp / "model.safetensors", provenance)
        manifest = {
            "source": "hub",
            "repo_id": model.repo_id,
            "revision": revision,
            "step": step,
            "commit": snapshot.name,
            "source_files": source_files,
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
            "weights_sha256": _combined_hash(
                {n: h for n, h in source_files.items() if _is_weight(n)}
            ),
        }
        manifest["duplicate_of"] = _duplicate_of(manifest["weights_sha256"], earlier)
        write_json(tmp / MANIFEST, manifest, provenance)
    manifest = read_json(out_dir / MANIFEST)  # as written: with its provenance
    if manifest["duplicate_of"] is not None:
        log.warning("step %d has the same weights as step %d", step, manifest["duplicate_of"])
    return manifest


def _convert_pickled_weights(files: list[Path], out: Path, provenance: dict | None) -> None:
    state = {}
    for f in files:
        if f.name.endswith(".bin"):
            # weights_only=True: tensors and plain containers only, never arbitrary code
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    tensors = {k: v.contiguous().clone() for k, v in state.items()}
    write_safetensors(out, tensors, provenance, metadata={"format": "pt"})


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def _combined_hash(file_hashes: dict[str, str]) -> str:
    return hashlib.sha256(
        "".join(f"{n}:{h}\n" for n, h in sorted(file_hashes.items())).encode()
    ).hexdigest()


def _duplicate_of(weights_sha256: str, earlier: list[Path]) -> int | None:
    for path in earlier:
        other = read_json(path)
        if other["weights_sha256"] == weights_sha256:
            return other["duplicate_of"] if other["duplicate_of"] is not None else other["step"]
    return None


# ---- micro suite ------------------------------------------------------------------------------------


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

    from saedynamics.corpus import load_tokenizer, read_token_sample

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
                "weights_sha256": _combined_hash({n: h for n, h in files.items() if _is_weight(n)}),
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
