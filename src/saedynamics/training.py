"""The trainer: a set of SAEs (architectures x seeds) from one source of batches.

It consumes a source of activation batches (sources.py: a cached file, tensors; never the file or
the model themselves) and knows only the SAE interface (`loss`, `before_step`, `after_step`,
`exported`, `save`). Every SAE of the set steps on the same batch, so one read of the data (or one
forward pass of the LM) feeds them all, as sparsify and dictionary_learning do. Each SAE has its own
optimiser, schedule and init RNG stream (the seed), and nothing it computes depends on the others:
on CPU a set trained together gives SAEs bitwise equal to each architecture trained alone on the
same data order (tests/test_training_set.py). The data-order RNG stream (`training.data_seed`) is
the job's; both seeds are recorded in every cfg.json.

Inputs are multiplied by a scale from the source's norm statistics (`input_scaling`, scaling.py),
folded into the weights at export, so saved SAEs work on raw activations. Schedule: Adam, linear lr
warm-up, constant, linear decay to 0 over the last `lr_decay_fraction`; gradient-norm clipping.
A NaN or infinite loss stops the job, naming the architecture, seed and step; nothing is written
then. So does a GPU out of memory, naming the settings that decide the memory, and so does a set
whose estimated memory (`training_memory`) exceeds what the device has, before it starts.

Resume: with a `resume_dir`, the job writes a checkpoint every `training.checkpoint_tokens` tokens
and restarts from the last one, bitwise as if uninterrupted on CPU (saedynamics.resume).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm

from saedynamics.artifacts import atomic_directory, write_parquet
from saedynamics.config import EXTRA_COLUMNS, TrainingConfig
from saedynamics.errors import ConfigError, ResourceError, TrainingDiverged
from saedynamics.metrics.reconstruction import batch_fvu
from saedynamics.resources import available_memory, human_bytes, out_of_memory_error, resolve_device
from saedynamics.resume import Checkpoints, fingerprint, remove_stale_temporaries
from saedynamics.saes import REGISTRY, SAE, ArchitectureConfig, TrainStep, sparse
from saedynamics.scaling import input_scale

log = logging.getLogger(__name__)


def lr_multiplier(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    warmup = round(warmup_fraction * total)
    decay_start = total - round(decay_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start and decay_start < total:  # no decay phase with decay_fraction 0
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def autocast_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the matmuls (None: plain fp32). Parameters and Adam state stay fp32
    either way: a bf16 optimiser state silently degrades SAEs."""
    precision = training.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


@contextmanager
def deterministic_algorithms(enabled: bool):
    """`training.deterministic`: torch's deterministic algorithms while the block runs.

    CPU kernels are deterministic anyway; on a GPU this removes the run-to-run differences of
    atomics and of cuBLAS's workspace choice, so one seed gives one SAE on one device and software
    stack. An operation without a deterministic CUDA kernel raises at its first call, which is
    turned into a message naming the key.
    """
    if not enabled:
        yield
        return
    # cuBLAS reduces reproducibly only with a fixed workspace, read when its first handle is made
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise ConfigError(
            f"training.deterministic is true, but an operation has no deterministic kernel on this "
            f"device: {str(e).splitlines()[0]} Set training.deterministic: false (the tolerance of "
            "non-deterministic GPU runs is in the README, Reproducibility). No SAE was written."
        ) from None
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def required_columns(architectures: dict[str, ArchitectureConfig]) -> tuple[str, ...]:
    """The columns a set of SAEs reads: the activations and every extra one any of them needs."""
    extras = {c for arch in architectures.values() for c in REGISTRY[arch.architecture].requires}
    return ("act", *sorted(extras))


def training_memory(training: TrainingConfig, architectures, d_in: int, source) -> dict[str, int]:
    """An estimate of the bytes a set takes on its device, by part (tests check it against what
    training allocates): every SAE's parameters, gradients and Adam moments (4x the trained ones)
    and buffers; the inputs an architecture keeps (the 2023 resampling pool: the trainer's batches,
    shared by the SAEs that keep them); one SAE's step at a time (~8 [batch, latents] float32
    tensors: pre-activations, codes, masks and their gradients); the source's shuffle buffer."""
    state = 0
    for arch in architectures.values():
        cls = REGISTRY[arch.architecture]
        with torch.device("meta"):  # shapes only: nothing is allocated
            sae = cls(d_in, training.n_latents, arch)
        params = sum(p.numel() * p.element_size() for p in sae.parameters())
        trained = sum(p.numel() * p.element_size() for p in sae.parameters() if p.requires_grad)
        buffers = sum(b.numel() * b.element_size() for b in sae.buffers())
        state += len(training.seeds) * (params + 3 * trained + buffers)
    kept = max(REGISTRY[a.architecture].kept_input_tokens(a) for a in architectures.values())
    return {
        "SAE state": state,
        "kept inputs": kept * d_in * 4,
        "a step": 8 * training.batch_size * training.n_latents * 4,
        "shuffle buffer": source.memory_bytes(
            required_columns(architectures), training.shuffle_tokens
        ),
    }


def check_memory(training: TrainingConfig, architectures, d_in, source, device) -> None:
    """ResourceError, before anything is allocated, when the set cannot fit the device."""
    need, free = training_memory(training, architectures, d_in, source), available_memory(device)
    if free is None or sum(need.values()) <= free:
        return
    n = len(architectures) * len(training.seeds)
    split = (
        "set training.split_by_architecture: true (a job per architecture), or "
        if len(architectures) > 1
        else ""
    )
    raise ResourceError(
        f"{n} SAEs ({len(architectures)} architectures x {len(training.seeds)} seeds, "
        f"training.n_latents {training.n_latents}, d_model {d_in}) need about "
        f"{human_bytes(sum(need.values()))} to train together ("
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in need.items())
        + f"), but {device.type} has {human_bytes(free)} available; {split}lower "
        "training.n_latents, training.batch_size or training.shuffle_tokens. No SAE was written."
    )


def train_saes(
    training: TrainingConfig,
    architectures: dict[str, ArchitectureConfig],
    source,
    out_dir: Path,
    identity: dict,
    provenance: dict,
    observe: Callable[[int, dict[str, dict[int, SAE]]], None] | None = None,
    resume_dir: Path | None = None,
) -> None:
    """Train one SAE per (architecture, seed) on `source`; write out_dir/<name>/seed<s>/.

    `architectures`: name -> hyperparameters, the set trained together. `source`: a
    sources.ShuffledSource (or anything with its `batches`, `d_model`, `norm`, `description`,
    `fingerprint` and `memory_bytes`). `observe(step, saes)`, if given, is called at every
    loss-curve step with the live SAEs ({name: {seed: SAE}}, in the scaled input space), e.g. to
    follow their recovery of a known dictionary. `resume_dir`: where checkpoints are written and
    resumed from (module docstring); None: none.
    """
    with deterministic_algorithms(training.deterministic):
        device = resolve_device(training.device)
        d_in, columns = source.d_model, required_columns(architectures)
        check_memory(training, architectures, d_in, source, device)
        scale = input_scale(source.norm, training.input_scaling, d_in)
        n_steps = max(1, training.train_tokens // training.batch_size)
        amp_dtype = autocast_dtype(training, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True

        saes: dict[tuple[str, int], SAE] = {}
        for name, arch in architectures.items():
            for seed in training.seeds:
                cls, init = REGISTRY[arch.architecture], torch.Generator().manual_seed(seed)
                saes[name, seed] = cls(d_in, training.n_latents, arch, generator=init).to(device)
        optimizers, schedules = {}, {}
        for key, sae in saes.items():
            betas = sae.adam_betas(training.adam_betas)
            optimizers[key] = torch.optim.Adam(sae.parameters(), lr=sae.lr, betas=betas)
            schedules[key] = torch.optim.lr_scheduler.LambdaLR(
                optimizers[key],
                lambda i: lr_multiplier(
                    i, n_steps, training.lr_warmup_fraction, training.lr_decay_fraction
                ),
            )
            sae.attach_optimizer(optimizers[key])
        curves: dict[tuple[str, int], list[dict]] = {key: [] for key in saes}
        by_name = {
            name: {seed: saes[name, seed] for seed in training.seeds} for name in architectures
        }

        for name in architectures:
            remove_stale_temporaries(out_dir / name)
        every = training.checkpoint_tokens
        checkpoints = Checkpoints(
            resume_dir,
            fingerprint(training, architectures, source, device, identity, provenance),
            every_steps=max(1, every // training.batch_size) if every else n_steps,
            batch_size=training.batch_size,
        )
        resumed = checkpoints.load(saes, optimizers, schedules, curves)
        start, states = resumed.batches_done, resumed.states

        replay = {key: state.get("replay_batches", 0) for key, state in states.items()}
        n_replay = max(replay.values(), default=0)
        started, reading = time.perf_counter(), [0.0]  # seconds spent producing batches
        batches = (
            _scaled(batch, scale)
            for batch in _timed(
                source.batches(
                    training.batch_size,
                    columns,
                    seed=training.data_seed,
                    buffer_rows=training.shuffle_tokens,
                    device=device,
                    start=start - n_replay,
                ),
                reading,
            )
        )
        if start:  # the inputs before the checkpoint that an architecture keeps (resume_state)
            replayed = [next(batches)[0] for _ in range(n_replay)]
            for key, sae in saes.items():
                sae.load_resume_state(states[key], replayed[n_replay - replay[key] :])
        else:  # the first training batches double as the init sample (b_dec, probes): init_tokens+
            first = [next(batches) for _ in range(-(-training.init_tokens // training.batch_size))]
            sample_x = torch.cat([x for x, _ in first])
            sample_extras = {c: torch.cat([e[c] for _, e in first]) for c in columns[1:]}
            with _out_of_memory_named(training, architectures, identity):
                for sae in saes.values():
                    sae.init_from_sample(sample_x, _own(sae, sample_extras))
            batches = itertools.chain(first, batches)

        with (
            sparse.mode(training.sparse_path),
            _out_of_memory_named(training, architectures, identity),
        ):
            for i in tqdm(range(start, n_steps), desc=f"train {len(saes)} SAEs", initial=start,
                          total=n_steps, mininterval=5, unit="step"):  # fmt: skip
                x, extras = next(batches)
                step = TrainStep(i, n_steps)
                log_row = i % training.log_every == 0 or i == n_steps - 1
                for (name, seed), sae in saes.items():
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                    ):
                        out = sae.loss(x, step, _own(sae, extras))
                    if not torch.isfinite(out.total):
                        raise TrainingDiverged(
                            f"{name} (step {identity['step']}, layer {identity['layer']}), seed "
                            f"{seed}: the loss is {out.total.item()} at training step {i} of "
                            f"{n_steps} (after {i * training.batch_size} tokens). Lower "
                            f"architectures.{name}.lr, or check the activations "
                            f"({source.description}). No SAE was written."
                        )
                    optimizer = optimizers[name, seed]
                    optimizer.zero_grad(set_to_none=True)
                    out.total.backward()
                    sae.before_step()
                    if training.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(sae.parameters(), training.grad_clip_norm)
                    optimizer.step()
                    schedules[name, seed].step()
                    sae.after_step(out, x, step)
                    if log_row:
                        curves[name, seed].append(_curve_row(i, training, out, x, sae, optimizer))
                if observe is not None and log_row:
                    with torch.no_grad():
                        observe(i, by_name)
                if checkpoints.due(i + 1, n_steps):
                    checkpoints.save(
                        i + 1, resumed, saes, optimizers, schedules, curves, provenance
                    )

        seconds = time.perf_counter() - started
        tokens = (n_steps - start) * training.batch_size  # trained by this process
        log.info(
            "%d SAEs x %d tokens in %.1f s (%.0f tokens/s per SAE, %.0f SAE-tokens/s in all); "
            "reading the batches took %.2f s, %.2f%% of it",
            len(saes), tokens, seconds, tokens / seconds, tokens * len(saes) / seconds,
            reading[0], 100 * reading[0] / seconds,
        )  # fmt: skip

        about = source.description
        metadata = {
            "model_name": about.get("model"),
            "hook_name": about.get("hook_point"),
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": about.get("context_length"),
            "model_from_pretrained_kwargs": {"revision": about.get("revision")},
        }
        for name in architectures:  # each architecture's directory renamed into place whole
            with atomic_directory(out_dir / name) as tmp:
                for seed in training.seeds:
                    ours = {
                        **identity,
                        "architecture_name": name,
                        "seed": seed,
                        "init_seed": seed,
                        "data_seed": training.data_seed,
                        "trained_with": sorted(architectures),
                        "tokens_seen": n_steps * training.batch_size,
                        "resumed_from_tokens": resumed.resumed_from_tokens,
                        "input_scale": scale,
                        "input_statistics": source.norm,  # the train cache's, or the eval cache's
                        "activations_source": about.get("source"),  # cache, stream or tensors
                        "precision": "fp32" if amp_dtype is None else "bf16 autocast, fp32 weights",
                        "deterministic_algorithms": training.deterministic,
                        "activations": {
                            k: about.get(k) for k in ("model", "revision", "commit", "hook")
                        },
                    }
                    saes[name, seed].exported(scale).save(
                        tmp / f"seed{seed}", metadata, ours, provenance, training.save_dtype
                    )
                    curve = pa.Table.from_pylist(curves[name, seed])
                    write_parquet(tmp / f"seed{seed}" / "training.parquet", curve, provenance)
        checkpoints.finished()


def _timed(items: Iterator, clock: list[float]) -> Iterator:
    """`items`, adding the seconds spent producing each to clock[0] (the reading share; on a GPU
    the time of an asynchronous copy shows where the copy is waited for)."""
    while True:
        t = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        clock[0] += time.perf_counter() - t
        yield item


def _own(sae: SAE, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The extra columns this SAE requires, of those read for the set."""
    return {c: extras[c] for c in sae.requires}


@contextmanager
def _out_of_memory_named(training: TrainingConfig, architectures, identity: dict) -> Iterator[None]:
    """A GPU out of memory, as an error naming the settings that decide how much training needs."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        names = ", ".join(architectures)
        split = ", or set training.split_by_architecture: true" if len(architectures) > 1 else ""
        raise out_of_memory_error(
            e,
            f"{names} (step {identity['step']}, layer {identity['layer']})",
            f"{len(architectures)} architectures x {len(training.seeds)} seeds x "
            f"{training.n_latents} latents trained together on batches of training.batch_size "
            f"{training.batch_size}: lower training.batch_size, or training.n_latents, or train "
            f"fewer training.seeds{split}. No SAE was written",
        ) from None


def _scaled(batch: dict, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x * scale, extras transformed alike)."""
    x = batch["act"] * scale
    extras = {
        c: v * scale ** EXTRA_COLUMNS[c]["scale_power"] for c, v in batch.items() if c != "act"
    }
    return x, extras


def _curve_row(i: int, training: TrainingConfig, out, x: torch.Tensor, sae, opt) -> dict:
    with torch.no_grad():
        return {
            "train_step": i,
            "tokens": (i + 1) * training.batch_size,
            "lr": opt.param_groups[0]["lr"],
            "loss": out.total.item(),
            **{k: v.item() for k, v in out.terms.items()},
            "l0": (out.codes != 0).sum(dim=-1).float().mean().item(),
            "fvu": batch_fvu(x, out.x_hat).item(),
            "dead_fraction": sae.dead_mask().float().mean().item(),
        }
