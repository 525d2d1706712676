"""The SAE interface, the registry of architectures, and the machinery they share.

An architecture is a subclass of `SAE` that declares its hyperparameters as a nested `Config`
(a pydantic model, validated with the study config) and registers itself by name:

    @register("topk")
    class TopKSAE(SAE):
        class Config(ArchitectureConfig):
            k: int = 32
        def encode(self, x): ...
        def loss(self, x, step, extras=None): ...

Parameters follow SAELens names and shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in]
(row i is latent i's decoder direction d_i), b_dec [d_in]. Codes f = sigma(pre), x_hat = f W_dec + b_dec.

Shared here, so that no architecture re-implements it (docs/spec/sae-variants.md section 0; "spec
N" in the architecture modules names that file's section N; docs/architectures.md compares each
architecture with its paper):
- decoder-norm handling: hard unit norm + gradient projection (`unit_norm_decoder = True`), or
  norms left free and folded into the encoder at export (`fold_decoder_norm`);
- tied init (W_enc = W_dec^T) with a chosen decoder row norm; b_dec at zero or the geometric median;
- dead-latent statistics counted in tokens, and the AuxK auxiliary loss that uses them;
- input scaling: the trainer feeds x * input_scale; `exported()` folds the scale into the weights so
  that a saved SAE works on raw activations (SAELens `fold_activation_norm_scaling_factor`);
- export, declared rather than overridden: `fold_decoder_norm_at_export` (whether `exported()` folds
  free decoder norms into the encoder) and `training_only_parameters` (parameters that shape
  training only and are left out of `weights()`, so of the saved SAE).

The trainer drives an SAE through this interface only:

    sae.init_from_sample(x, extras)          once, on the first training tokens (b_dec, probes, ...)
    sae.attach_optimizer(opt)                for architectures that reset optimiser state
    out = sae.loss(x, step, extras)          LossOutput(total, terms, codes, x_hat)
    out.total.backward(); sae.before_step(); optimiser step; sae.after_step(out, x, step)

`after_step` gets the step's `TrainStep` as `loss` did, so nothing needs to carry it from one call
to the other: an architecture keeps no attribute just to pass the step along.

Training checkpoints (training.py) save state_dict() (parameters and buffers: keep training state
in buffers where it is a tensor) plus `resume_state()`: what an architecture keeps in plain Python
attributes (counters, RNG states, recent inputs), restored by `load_resume_state` when a killed job
resumes, so that it ends bitwise as an uninterrupted run would.

`extras` holds the extra activation columns an architecture `requires` (e.g. the LM-loss gradient,
see `activations.EXTRA_COLUMNS`), already transformed with the input scale. `exported_buffers` are
buffers that belong to the saved SAE (e.g. a JumpReLU-style `threshold`). Saved tensors use the
names SAELens gives the same architecture, so SAELens loads our files where it has the
architecture (`saelens_architecture`); the others say so in cfg.json.

Reconstruction loss unit: mean over tokens of the summed squared error, mean_b sum_j (x - x_hat)^2
(dictionary_learning and SAELens convention; spec section 0.6).
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from saedynamics.artifacts import atomic_directory, write_json, write_safetensors
from saedynamics.errors import DataError
from saedynamics.saes import sparse
from saedynamics.schema import StrictModel


class ArchitectureConfig(StrictModel):
    """Hyperparameters every architecture has; subclasses add their own (strict types, as the
    study config: `k: true` is not 1, `lr: 3e-4` is a number)."""

    architecture: str = Field(description="registered architecture name")
    lr: float | None = Field(
        default=None, gt=0, description="Adam learning rate; None: the architecture's default"
    )
    dead_tokens: int = Field(
        default=10_000_000,
        gt=0,
        description="a latent is dead after this many tokens without firing",
    )
    b_dec_init: Literal["zero", "geometric_median", "mean"] | None = Field(
        default=None, description="decoder bias init from the first batch; None: the paper's choice"
    )
    adam_betas: tuple[float, float] | None = Field(
        default=None,
        strict=False,  # YAML and JSON give lists
        description="Adam (beta1, beta2); None: the architecture's default, else training.adam_betas",
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v):
        if v is not None and not all(0 <= b < 1 for b in v):
            raise ValueError(f"Adam betas must be in [0, 1), got {v}")
        return v

    def check_dimensions(self, d_model: int, n_latents: int) -> None:
        """Raise ValueError if the hyperparameters do not fit these dimensions."""


REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator: make an architecture available under `name`."""

    def decorate(cls: type[SAE]) -> type[SAE]:
        if name in REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return decorate


class TrainStep(NamedTuple):
    """Where training stands; schedules inside a loss (e.g. an L1 warm-up) read `progress`."""

    index: int
    total: int

    @property
    def progress(self) -> float:
        return self.index / max(self.total, 1)

    def ramp(self, warmup_fraction: float) -> float:
        """A linear warm-up factor: 0 -> 1 over the first `warmup_fraction` of training."""
        return 1.0 if warmup_fraction == 0 else min(1.0, self.progress / warmup_fraction)


@dataclass
class LossOutput:
    total: Tensor  # scalar to minimise
    terms: dict[str, Tensor]  # named scalar parts, for the loss curve
    codes: Tensor  # [batch, d_sae]
    x_hat: Tensor  # [batch, d_in]


class SAE(nn.Module):
    architecture: ClassVar[str]
    title: ClassVar[str] = ""  # the name in words, for figure legends
    Config: ClassVar[type[ArchitectureConfig]] = ArchitectureConfig
    saelens_architecture: ClassVar[str | None] = None  # SAELens can load it under this name
    unit_norm_decoder: ClassVar[bool] = True  # else: norms are free and folded at export
    decoder_init_norm: ClassVar[float] = 1.0
    apply_b_dec_to_input: ClassVar[bool] = True  # pre = (x - b_dec) W_enc + b_enc
    default_b_dec_init: ClassVar[str] = "zero"  # or "geometric_median" / "mean" of the init sample
    base_lr: ClassVar[float] = 2e-4
    default_adam_betas: ClassVar[tuple[float, float] | None] = None  # None: training.adam_betas
    requires: ClassVar[tuple[str, ...]] = ()  # extra activation columns the loss needs
    exported_buffers: ClassVar[tuple[str, ...]] = ()  # buffers saved with the weights
    # parameters that shape training only: not in weights(), so not saved (e.g. an extra encoder)
    training_only_parameters: ClassVar[tuple[str, ...]] = ()
    # exported(): fold free decoder norms into the encoder (no effect with unit_norm_decoder).
    # False where the fold would change the codes (a top-k over pre-activations is not invariant to
    # per-latent rescaling): the saved SAE keeps its decoder norms.
    fold_decoder_norm_at_export: ClassVar[bool] = True
    # codes are top-k sparse and need no gradient where they are zero: decode through the sparse
    # path (saes/sparse.py). Not JumpReLU: its threshold's pseudo-gradient lives just below it.
    sparse_codes: ClassVar[bool] = False

    def __init__(self, d_in: int, d_sae: int, cfg: ArchitectureConfig, generator=None):
        super().__init__()
        self.d_in, self.d_sae, self.cfg = d_in, d_sae, cfg
        # Tied init: random decoder rows at the chosen norm, encoder = decoder^T (spec 0.2).
        w = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w, a=5**0.5, generator=generator)
        w = w / w.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self._optimizer = None  # weak reference, set by attach_optimizer

    # ---- the interface -------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        return sparse.linear(x_in, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Codes at inference [batch, d_sae]."""
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        if self.sparse_codes:
            return sparse.codes_matmul(codes, self.W_dec) + self.b_dec
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(
        self, x: Tensor, step: TrainStep, extras: dict[str, Tensor] | None = None
    ) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self) -> None:
        """Called after backward, before the optimiser step."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            remove_parallel_gradient_(self.W_dec)

    @torch.no_grad()
    def after_step(self, out: LossOutput, x: Tensor, step: TrainStep) -> None:
        """Called after the optimiser step with the step's loss output, (scaled) input and the
        `TrainStep` its `loss` got: constraints and statistics. Subclasses extend it (thresholds,
        EMAs, resampling, schedules that depend on the step)."""
        if self.unit_norm_decoder:
            normalise_rows_(self.W_dec)
        fired = (out.codes != 0).any(dim=0)
        self.tokens_since_fired += out.codes.shape[0]
        self.tokens_since_fired[fired] = 0

    def resume_state(self) -> dict[str, Any]:
        """Training state outside state_dict(), for a training checkpoint: JSON values, and tensors
        (e.g. a generator's state). An architecture that keeps recent training batches stores how
        many under "replay_batches" instead of the batches: on resume the trainer reads those
        again from the (deterministic) data stream and hands them to `load_resume_state`."""
        return {}

    def load_resume_state(self, state: dict[str, Any], replayed: list[Tensor]) -> None:
        """Restore what `resume_state` returned (after load_state_dict); `replayed`: the last
        state["replay_batches"] training inputs before the checkpoint, oldest first."""

    @classmethod
    def kept_input_tokens(cls, cfg: ArchitectureConfig) -> int:
        """How many recent training inputs the SAE keeps (for the trainer's memory estimate)."""
        return 0

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer() if self._optimizer is not None else None

    def default_lr(self) -> float:
        """Adam lr when the config leaves it unset."""
        return self.base_lr

    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.default_lr()

    def adam_betas(self, fallback: tuple[float, float]) -> tuple[float, float]:
        return self.cfg.adam_betas or self.default_adam_betas or fallback

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> None:
        """Data-dependent init from the first (scaled) training tokens: b_dec (spec 0.2)."""
        how = self.cfg.b_dec_init or self.default_b_dec_init
        if how == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif how == "mean":
            self.b_dec.copy_(x.mean(dim=0))

    # ---- export --------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Make decoder rows unit norm without changing x_hat: f_i * |d_i| and d_i / |d_i|.

        Exact for positively homogeneous activations (ReLU, TopK on pre-acts scaled per latent).
        """
        norms = self.W_dec.norm(dim=1)
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Trained on x * scale; afterwards works on raw x with identical codes and x_hat / scale."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def exported(self, input_scale: float) -> SAE:
        """A copy for inference on raw activations: input scale folded, and decoder rows unit norm
        (free norms folded into the encoder, unless `fold_decoder_norm_at_export` is False)."""
        sae = copy.deepcopy(self).cpu().float()
        sae._optimizer = None
        if not self.unit_norm_decoder and self.fold_decoder_norm_at_export:
            sae.fold_decoder_norm()
        sae.fold_input_scale(input_scale)
        return sae

    def saelens_config(self) -> dict[str, Any]:
        """The SAELens cfg.json fields for this SAE (architecture-specific extras added by subclasses)."""
        return {
            # an architecture SAELens lacks: SAELens looks this name up in its registry and
            # raises KeyError with it, so the name itself tells the user what to do instead
            "architecture": self.saelens_architecture
            or f"{self.architecture} (not a SAELens architecture: load with saedynamics.saes.load)",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }

    def save(
        self,
        directory: str | Path,
        metadata: dict[str, Any],
        record: dict[str, Any],
        provenance: dict[str, Any] | None = None,
        dtype: str = "float32",
    ) -> None:
        """Write `directory` (SAELens layout: cfg.json + sae_weights.safetensors), atomically.

        `metadata`: SAELens's cfg.json "metadata"; `record`: ours (identity, seeds, tokens seen),
        under "saedynamics"; `provenance`: in cfg.json and in the weights' header; `dtype`: of the
        saved weights (training.save_dtype; `load` computes in float32 whatever it reads).
        """
        cfg = self.saelens_config() | {"dtype": dtype}
        # SAELens reads cfg.json as its v6 format only when it names a 6.x version
        cfg["metadata"] = {"sae_lens_version": "6.0.0", **metadata}
        cfg["saedynamics"] = {
            "architecture": self.architecture,
            "hyperparameters": self.cfg.model_dump(mode="json"),
            "loadable_by": ["saedynamics"] + (["sae_lens"] if self.saelens_architecture else []),
            **record,
        }
        if not self.saelens_architecture:
            cfg["saedynamics"]["note"] = (
                f"SAELens has no {self.architecture!r} architecture: load this SAE with "
                "saedynamics.saes.load(directory)"
            )
        kind = getattr(torch, dtype)
        tensors = {k: v.detach().cpu().to(kind).contiguous() for k, v in self.weights().items()}
        with atomic_directory(directory) as tmp:
            write_json(tmp / "cfg.json", cfg, provenance)
            write_safetensors(tmp / "sae_weights.safetensors", tensors, provenance)

    def weights(self) -> dict[str, Tensor]:
        """The tensors an exported SAE consists of: its parameters but the
        `training_only_parameters`, and its `exported_buffers` (no training statistics)."""
        skip = set(self.training_only_parameters)
        out = {name: p for name, p in self.named_parameters() if name not in skip}
        out.update({name: getattr(self, name) for name in self.exported_buffers})
        return out


def load(directory: str | Path) -> SAE:
    """Load an SAE saved by `SAE.save` (any registered architecture).

    Checked before any tensor is read: cfg.json's architecture, hyperparameters, d_in and d_sae,
    and that the tensors in sae_weights.safetensors are exactly those, of the shapes, that this
    architecture at that d_in and d_sae has. Anything else raises DataError naming the file, the
    key or the tensor.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / "cfg.json", directory / "sae_weights.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{directory}: not a readable SAE directory ({e})") from None
    try:
        with safe_open(weights_path, framework="pt") as f:  # the header only
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise DataError(
            f"{weights_path}: not a readable safetensors file ({type(e).__name__}: {e}); "
            "delete the SAE directory and rerun the train rule"
        ) from None
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_path}: not a JSON object")
    if not isinstance(cfg.get("saedynamics"), dict):
        raise DataError(
            f"{cfg_path}: not an SAE saved by saedynamics (no 'saedynamics' section); an SAE "
            "saved by SAELens loads with sae_lens.SAE.load_from_disk"
        )
    ours = cfg["saedynamics"]
    name = ours.get("architecture")
    if name not in REGISTRY:
        raise DataError(
            f"{cfg_path}: architecture {name!r} is not registered; "
            f"registered: {', '.join(sorted(REGISTRY))}"
        )
    cls = REGISTRY[name]
    dims = {key: cfg.get(key) for key in ("d_in", "d_sae")}
    for key, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{cfg_path}: {key} must be a positive integer, found {value!r}")
    d_in, d_sae = dims["d_in"], dims["d_sae"]
    # the two matrices every architecture has, checked before an SAE of that size is built
    implied = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}
    absent = [k for k in implied if k not in found]
    wrong = {k: found[k] for k in implied if k in found and found[k] != implied[k]}
    if absent or wrong:
        raise DataError(
            f"{weights_path}: tensors do not match cfg.json: "
            + (f"missing tensors {absent}" if absent else "")
            + ("; " if absent and wrong else "")
            + (
                f"its d_in {d_in} and d_sae {d_sae} imply "
                + ", ".join(f"{k} {list(implied[k])}" for k in wrong)
                + ", the file holds "
                + ", ".join(f"{k} {list(v)}" for k, v in wrong.items())
                if wrong
                else ""
            )
        )
    try:
        hyper = cls.Config.model_validate(ours.get("hyperparameters"))
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise DataError(
            f"{cfg_path}: saedynamics.hyperparameters are not valid for {name!r} ({errors})"
        ) from None
    sae = cls(d_in, d_sae, hyper)
    expected = {k: tuple(v.shape) for k, v in sae.weights().items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shapes = [
            f"{k} is {list(found[k])}, cfg.json implies {list(expected[k])}"
            for k in sorted(set(expected) & set(found))
            if found[k] != expected[k]
        ]
        problems = [f"missing tensors {missing}"] if missing else []
        problems += [f"unexpected tensors {unexpected}"] if unexpected else []
        raise DataError(
            f"{weights_path}: tensors do not match cfg.json (architecture {name!r}, d_in {d_in}, "
            f"d_sae {d_sae}): " + "; ".join(problems + shapes)
        )
    try:
        tensors = load_file(weights_path)
    except (OSError, SafetensorError) as e:
        raise DataError(
            f"{weights_path}: not a readable safetensors file ({type(e).__name__}: {e}); "
            "delete the SAE directory and rerun the train rule"
        ) from None
    sae.load_state_dict(tensors, strict=False)
    sae.metadata = cfg.get("metadata", {})
    sae.provenance = ours
    return sae.eval()


# ---- shared machinery ------------------------------------------------------------------------


def normalise_rows_(w: Tensor, eps: float = 1e-8) -> None:
    """In place: every row of `w` to unit norm (W_dec [d_sae, d_in]: one row per latent)."""
    w.data.div_(w.data.norm(dim=1, keepdim=True).clamp_min(eps))


def remove_parallel_gradient_(w: nn.Parameter) -> None:
    """In place: drop the gradient component along each (unit) row, g_i -= (g_i . d_i) d_i.

    With unit rows this keeps the optimiser step tangent to the sphere; the renormalisation after
    the step then only corrects second-order drift.
    """
    unit = w.data / w.data.norm(dim=1, keepdim=True).clamp_min(1e-8)
    w.grad.sub_((w.grad * unit).sum(dim=1, keepdim=True) * unit)


def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x."""
    x = x.double()
    g = x.mean(dim=0)
    for _ in range(max_iter):
        w = 1.0 / (x - g).norm(dim=1).clamp_min(1e-12)
        g_next = (w[:, None] * x).sum(dim=0) / w.sum()
        if (g_next - g).norm() < tol:
            g = g_next
            break
        g = g_next
    return g.float()


def auxk_loss(
    x: Tensor, x_hat: Tensor, pre: Tensor, W_dec: Tensor, dead: Tensor, k_aux: int
) -> Tensor:
    """AuxK (Gao et al. 2024, App. A.2): model the residual with the top-k_aux dead latents.

        e = sg(x - x_hat);  I = top-k_aux of pre over dead latents;  e_hat = sum_{i in I} ReLU(pre_i) d_i
        L_aux = sum_b |e - e_hat|^2 / sum_b |e - mean_b e|^2      (0 when no latent is dead)

    e_hat has no b_dec: the residual already excludes it (the double count of spec 0.3 avoided).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    e = (x - x_hat).detach()
    k = min(k_aux, n_dead)
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    values, indices = dead_pre.topk(k, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    e_hat = sparse.codes_matmul(aux_codes, W_dec)
    denominator = (e - e.mean(dim=0)).pow(2).sum()
    return (e - e_hat).pow(2).sum() / denominator.clamp_min(1e-12)


def mean_squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """The training reconstruction loss: mean_b sum_j (x - x_hat)^2."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()
