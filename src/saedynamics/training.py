"""The trainer: every seed of one (step, layer, architecture) from one read of the data.

It consumes an iterator of activation batches and knows only the SAE interface (`loss`,
`before_step`, `after_step`, `exported`, `save`); it never sees the language model. All seeds
advance on the same batch: the data-order RNG stream (`training.data_seed`) is shared by the job,
the init RNG stream is the seed itself, and both are recorded in every cfg.json.

Inputs are multiplied by a scale from the activation file's norm statistics (`input_scaling`) and
the scale is folded into the weights at export, so saved SAEs work on raw activations. Schedule: Adam, linear lr warm-up,
constant, linear decay to 0 over the last `lr_decay_fraction`; gradient-norm clipping.
A NaN or infinite loss stops the job, naming the seed and the step; nothing is written then, since
all seeds are saved together into one directory renamed into place at the end. So does a GPU out of
memory, naming training.batch_size and the other settings that decide the memory.

Resume: with a `resume_dir`, checkpoints every `training.checkpoint_tokens` tokens and restarts
from the last one, bitwise as if uninterrupted on CPU (saedynamics.resume).
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

from saedynamics.activations import ActivationFile, out_of_memory_error, resolve_device
from saedynamics.artifacts import atomic_directory, write_parquet
from saedynamics.config import EXTRA_COLUMNS, TrainingConfig
from saedynamics.errors import ConfigError, TrainingDiverged
from saedynamics.metrics.reconstruction import batch_fvu
from saedynamics.resume import Checkpoints, fault_point, fingerprint, remove_stale_temporaries
from saedynamics.saes import REGISTRY, SAE, ArchitectureConfig, TrainStep, sparse

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


def train_saes(
    training: TrainingConfig,
    name: str,
    arch: ArchitectureConfig,
    train_file: Path | ActivationFile,
    out_dir: Path,
    identity: dict,
    provenance: dict,
    observe: Callable[[int, dict[int, SAE]], None] | None = None,
    resume_dir: Path | None = None,
) -> None:
    """Train one SAE per seed on `train_file`; write out_dir/seed<s>/ for all seeds at once.

    `observe(step, saes)`, if given, is called at every loss-curve step with the live SAEs
    (in the scaled input space), e.g. to follow their recovery of a known dictionary.
    `resume_dir`: where checkpoints are written and resumed from (module docstring); None: none.
    `train_file`: a path (opened and verified against its checksum here) or an ActivationFile
    the caller has opened (and verified) already.
    """
    with deterministic_algorithms(training.deterministic):
        acts = train_file if isinstance(train_file, ActivationFile) else ActivationFile(train_file)
        device = resolve_device(training.device)
        d_in = acts.d_model
        scale = acts.input_scale(training.input_scaling)
        n_steps = max(1, training.train_tokens // training.batch_size)

        amp_dtype = autocast_dtype(training, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True

        cls = REGISTRY[arch.architecture]
        columns = ("act", *cls.requires)
        saes = {
            seed: cls(
                d_in, training.n_latents, arch, generator=torch.Generator().manual_seed(seed)
            ).to(device)
            for seed in training.seeds
        }
        optimizers = {
            s: torch.optim.Adam(
                sae.parameters(), lr=sae.lr, betas=sae.adam_betas(training.adam_betas)
            )
            for s, sae in saes.items()
        }
        schedules = {
            s: torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda i: lr_multiplier(
                    i, n_steps, training.lr_warmup_fraction, training.lr_decay_fraction
                ),
            )
            for s, opt in optimizers.items()
        }
        for seed, sae in saes.items():
            sae.attach_optimizer(optimizers[seed])
        curves: dict[int, list[dict]] = {s: [] for s in saes}

        remove_stale_temporaries(out_dir)
        every = training.checkpoint_tokens
        checkpoints = Checkpoints(
            resume_dir,
            fingerprint(training, name, arch, acts, device, identity, provenance),
            every_steps=max(1, every // training.batch_size) if every else n_steps,
            batch_size=training.batch_size,
        )
        resumed = checkpoints.load(saes, optimizers, schedules, curves)
        start, states = resumed.batches_done, resumed.states

        replay = {seed: state.get("replay_batches", 0) for seed, state in states.items()}
        n_replay = max(replay.values(), default=0)
        batches = (
            _scaled(batch, scale, device)
            for batch in acts.shuffled(
                training.batch_size,
                seed=training.data_seed,
                columns=columns,
                start_batch=start - n_replay,
            )
        )
        if start:  # the inputs before the checkpoint that an architecture keeps (resume_state)
            replayed = [next(batches)[0] for _ in range(n_replay)]
            for seed, sae in saes.items():
                sae.load_resume_state(states[seed], replayed[n_replay - replay[seed] :])
        else:  # the first training batches double as the init sample (b_dec, probes): init_tokens+
            first = [next(batches) for _ in range(-(-training.init_tokens // training.batch_size))]
            sample_x = torch.cat([x for x, _ in first])
            sample_extras = {c: torch.cat([e[c] for _, e in first]) for c in columns[1:]}
            with _out_of_memory_named(training, name, identity):
                for sae in saes.values():
                    sae.init_from_sample(sample_x, sample_extras)
            batches = itertools.chain(first, batches)
        started = time.perf_counter()

        with sparse.mode(training.sparse_path), _out_of_memory_named(training, name, identity):
            for i in tqdm(
                range(start, n_steps),
                desc=f"train {name}",
                initial=start,
                total=n_steps,
                mininterval=5,
                unit="step",
            ):
                x, extras = next(batches)
                step = TrainStep(i, n_steps)
                for seed, sae in saes.items():
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                    ):
                        out = sae.loss(x, step, extras)
                    if not torch.isfinite(out.total):
                        raise TrainingDiverged(
                            f"{name} (step {identity['step']}, layer {identity['layer']}), seed {seed}: the loss "
                            f"is {out.total.item()} at training step {i} of {n_steps} (after {i * training.batch_size} "
                            f"tokens). Lower architectures.{name}.lr, or check the activations in {acts.path}. "
                            "No SAE was written."
                        )
                    optimizers[seed].zero_grad(set_to_none=True)
                    out.total.backward()
                    sae.before_step()
                    if training.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(sae.parameters(), training.grad_clip_norm)
                    optimizers[seed].step()
                    schedules[seed].step()
                    sae.after_step(out, x)
                    if i % training.log_every == 0 or i == n_steps - 1:
                        curves[seed].append(_curve_row(i, training, out, x, sae, optimizers[seed]))
                if observe is not None and (i % training.log_every == 0 or i == n_steps - 1):
                    with torch.no_grad():
                        observe(i, saes)
                if checkpoints.due(i + 1, n_steps):
                    checkpoints.save(
                        i + 1, resumed, saes, optimizers, schedules, curves, provenance
                    )
                fault_point(str(i + 1))

        seconds = time.perf_counter() - started
        tokens = (n_steps - start) * training.batch_size  # trained by this process
        log.info(
            "%s: %d seeds x %d tokens in %.1f s (%.0f tokens/s per seed, %.0f in all)",
            name,
            len(saes),
            tokens,
            seconds,
            tokens / seconds,
            tokens * len(saes) / seconds,
        )

        with atomic_directory(out_dir) as tmp:
            for seed, sae in saes.items():
                metadata = {
                    "model_name": acts.metadata.get("model"),
                    "hook_name": acts.metadata.get("hook_point"),
                    "hook_head_index": None,
                    "prepend_bos": False,
                    "context_size": acts.metadata.get("context_length"),
                    "model_from_pretrained_kwargs": {"revision": acts.metadata.get("revision")},
                }
                ours = {
                    **identity,
                    "architecture_name": name,
                    "seed": seed,
                    "init_seed": seed,
                    "data_seed": training.data_seed,
                    "tokens_seen": n_steps * training.batch_size,
                    "resumed_from_tokens": resumed.resumed_from_tokens,
                    "input_scale": scale,
                    "precision": "fp32" if amp_dtype is None else "bf16 autocast, fp32 weights",
                    "deterministic_algorithms": training.deterministic,
                    "activations": {
                        k: acts.metadata.get(k) for k in ("model", "revision", "commit", "hook")
                    },
                }
                sae.exported(scale).save(tmp / f"seed{seed}", metadata, ours, provenance)
                curve = pa.Table.from_pylist(curves[seed])
                write_parquet(tmp / f"seed{seed}" / "training.parquet", curve, provenance)
            fault_point(f"{n_steps}:during-output")
        checkpoints.finished()


@contextmanager
def _out_of_memory_named(training: TrainingConfig, name: str, identity: dict) -> Iterator[None]:
    """A GPU out of memory, as an error naming the settings that decide how much training needs."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise out_of_memory_error(
            e,
            f"{name} (step {identity['step']}, layer {identity['layer']})",
            f"{len(training.seeds)} seeds x {training.n_latents} latents trained together on "
            f"batches of training.batch_size {training.batch_size}: lower training.batch_size, or "
            "training.n_latents, or train fewer training.seeds. No SAE was written",
        ) from None


def _scaled(batch: dict, scale: float, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x * scale, extras transformed alike) on the device."""
    x = batch["act"].to(device) * scale
    extras = {
        c: v.to(device) * scale ** EXTRA_COLUMNS[c]["scale_power"]
        for c, v in batch.items()
        if c != "act"
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
