"""The study configuration: pydantic models, the one source of defaults.

A study config (config.yaml, workflow/configs/*.yaml) is validated by `load_config` when the
Snakefile loads and when any CLI command starts. Every rule receives only the slice of the config
its stage depends on (`StudyConfig.stage_settings`), as JSON; so changing e.g. a figure setting
re-runs the figures and nothing upstream, and every artifact records the hash of exactly the
settings that produced it.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from saedynamics.errors import ConfigError
from saedynamics.saes import REGISTRY, ArchitectureConfig
from saedynamics.schema import StrictModel, yaml12_number

SLUG = r"^[a-z0-9][a-z0-9_.\-]*$"  # names that become path components


# ---- text and tokens -----------------------------------------------------------------------------


class CorpusConfig(StrictModel):
    """Where the text comes from. Everything goes through the `datasets` library."""

    source: Literal["pydoc", "hub", "files"] = Field(
        default="pydoc",
        description="pydoc: Python's own documentation (offline); hub: a Hub dataset; files: local files",
    )
    dataset: str | None = Field(default=None, description="hub: dataset id")
    subset: str | None = Field(default=None, description="hub: dataset configuration name")
    revision: str | None = Field(default=None, description="hub: dataset revision (pin it)")
    data_files: list[str] | None = Field(default=None, description="files: paths or globs")
    format: Literal["text", "json", "parquet", "csv"] = Field(
        default="json", description="files: the datasets builder that reads them"
    )
    split: str = "train"
    text_field: str = "text"

    @model_validator(mode="after")
    def _source_fields(self) -> CorpusConfig:
        if self.source == "hub" and not self.dataset:
            raise ValueError("corpus.source 'hub' needs corpus.dataset (a Hub dataset id)")
        if self.source == "files" and not self.data_files:
            raise ValueError("corpus.source 'files' needs corpus.data_files (paths or globs)")
        return self


class TokensConfig(StrictModel):
    """The fixed token sample: context windows drawn once per study, reused for every checkpoint."""

    context_length: int = Field(default=128, ge=2, le=8192)
    train_sequences: int | None = Field(
        default=None, gt=0, description="windows in the train split; None: all that remain"
    )
    eval_sequences: int = Field(default=64, gt=0)
    shard_sequences: int = Field(
        default=65536,
        gt=0,
        description="train windows per shard of the sample (a killed tokens job resumes after "
        "the last one written)",
    )
    seed: int = 0


# ---- the language model ------------------------------------------------------------------------

# EleutherAI Pythia sizes (docs/spec/measurements.md section 4.1): layers and d_model.
PYTHIA = {
    "14m": (6, 128),
    "31m": (6, 256),
    "70m": (6, 512),
    "160m": (12, 768),
    "410m": (24, 1024),
    "1b": (16, 2048),
    "1.4b": (24, 2048),
    "2.8b": (32, 2560),
    "6.9b": (32, 4096),
    "12b": (36, 5120),
}
PYTHIA_STEPS = sorted({0, *(2**i for i in range(10)), *range(1000, 143001, 1000)})


def pythia_size(repo_id: str) -> str | None:
    m = re.fullmatch(r"EleutherAI/pythia-([0-9.]+[mb])(-deduped|-seed\d)?(-v0)?", repo_id)
    return m.group(1) if m and m.group(1) in PYTHIA else None


class HubModelConfig(StrictModel):
    """Checkpoints of a model on the Hugging Face Hub, one revision per training step."""

    source: Literal["hub"]
    repo_id: str = "EleutherAI/pythia-70m-deduped"
    steps: list[int]
    revision: str = Field(default="step{step}", description="revision template, {step} filled in")
    tokenizer_revision: str = Field(
        default="main", description="revision to take the tokenizer from"
    )
    num_layers: int | None = Field(
        default=None, gt=0, description="known for Pythia; else required"
    )
    d_model: int | None = Field(default=None, gt=0, description="known for Pythia; else required")
    cache_dir: str | None = Field(default=None, description="HF hub cache; None: HF_HUB_CACHE")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        # the Hub's own rule; the id also names a folder of the HF cache, so '..' may not escape it
        if not re.fullmatch(r"([\w.\-]+/)?[\w.\-]+", v) or ".." in v or "--" in v or len(v) > 96:
            raise ValueError(f"{v!r} is not a Hugging Face repo id (like 'EleutherAI/pythia-70m')")
        return v

    @field_validator("revision", "tokenizer_revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        if ".." in v or v.startswith("/") or not v.strip():
            raise ValueError(f"{v!r} is not a git revision (it also names a file of the HF cache)")
        return v

    @field_validator("revision")
    @classmethod
    def _revision_template(cls, v: str) -> str:
        try:
            ok = "{step}" in v and bool(v.format(step=0))
        except (KeyError, IndexError, ValueError):
            ok = False  # braces other than {step}
        if not ok:
            raise ValueError(
                f"{v!r} must contain {{step}} and no other braces (e.g. 'step{{step}}'), else "
                "every step would load the same revision"
            )
        return v

    @model_validator(mode="after")
    def _known_model(self) -> HubModelConfig:
        size = pythia_size(self.repo_id)
        if size is not None:
            layers, d_model = PYTHIA[size]
            object.__setattr__(self, "num_layers", self.num_layers or layers)
            object.__setattr__(self, "d_model", self.d_model or d_model)
            bad = [s for s in self.steps if s not in PYTHIA_STEPS]
            if bad:
                raise ValueError(
                    f"model.steps {bad} are not Pythia revisions; Pythia has step0, step1, 2, 4, ..., 512, "
                    "then every 1000 up to step143000"
                )
        elif self.num_layers is None or self.d_model is None:
            raise ValueError(
                f"{self.repo_id} is not a known Pythia model: set model.num_layers and model.d_model"
            )
        elif any(s < 0 for s in self.steps):
            raise ValueError(f"model.steps {self.steps}: steps must be >= 0")
        return self


class MicroModelConfig(StrictModel):
    """A tiny GPT-NeoX (the Pythia architecture) trained here: the offline miniature of the study."""

    source: Literal["micro"]
    steps: list[int] = Field(description="checkpoints the study analyses; must be on the schedule")
    vocab_size: int = Field(default=1024, ge=300, description="BPE tokenizer trained on the corpus")
    d_model: int = Field(default=64, gt=0)
    num_layers: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    intermediate_size: int | None = Field(default=None, description="None: 4 * d_model")
    rotary_pct: float = Field(default=0.25, gt=0, le=1)
    train_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=16, gt=0, description="sequences per optimiser step")
    lr: float = Field(default=1e-3, gt=0, description="peak lr (Pythia-70M: 1e-3)")
    warmup_fraction: float = Field(default=0.01, ge=0, le=1)
    min_lr_fraction: float = Field(default=0.1, ge=0, le=1, description="cosine decays to this")
    weight_decay: float = Field(default=0.01, ge=0)
    checkpoint_every: int = Field(default=100, gt=0, description="after step 512 (Pythia: 1000)")
    seed: int = 0

    def schedule(self) -> list[int]:
        """Pythia's checkpoint schedule in miniature: 0, 1, 2, 4, ..., 512, then regular, and the end."""
        log_spaced = [0] + [2**i for i in range(10) if 2**i <= self.train_steps]
        regular = range(self.checkpoint_every, self.train_steps + 1, self.checkpoint_every)
        return sorted({*log_spaced, *(s for s in regular if s > 512), self.train_steps})

    @model_validator(mode="after")
    def _steps_on_schedule(self) -> MicroModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        bad = [s for s in self.steps if s not in self.schedule()]
        if bad:
            raise ValueError(
                f"model.steps {bad} are not saved by the micro suite; its schedule is {self.schedule()}"
            )
        return self


ModelConfig = Annotated[HubModelConfig | MicroModelConfig, Field(discriminator="source")]


# ---- activations, SAE training, measurements ------------------------------------------------------


# Per-token columns the activation stage can store besides `act`, for architectures that `require`
# them (SAE.requires). scale_power: how a column transforms when the trainer scales the input by s
# (the gradient of the loss w.r.t. s*x is grad / s).
EXTRA_COLUMNS = {
    "lm_entropy": {
        "vector": False,
        "scale_power": 0,
        "description": "entropy of the LM's next-token distribution at the position (nats)",
    },
    "lm_grad": {
        "vector": True,
        "scale_power": -1,
        "description": "gradient of the window's summed next-token loss w.r.t. the activation",
    },
}


class ActivationsConfig(StrictModel):
    layers: list[int] = Field(description="residual stream after block L (hook gpt_neox.layers[L])")
    extra_columns: list[Literal["lm_entropy", "lm_grad"]] = Field(
        default=[],
        description="also store these per-token columns (added automatically when an "
        "architecture of the study needs them)",
    )
    drop_first_position: bool = Field(
        default=True, description="position 0 has outlier norms; dropped for every checkpoint alike"
    )
    batch_sequences: int = Field(default=32, gt=0, description="sequences per forward pass")
    row_group_rows: int = Field(default=8192, gt=0, description="Parquet row group size")
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrainingConfig(StrictModel):
    """Settings every architecture shares; each architecture adds its own (see `architectures`)."""

    n_latents: int = Field(gt=0, description="dictionary size d_sae")
    seeds: list[int] = Field(default=[0, 1, 2], description="one SAE per seed (init RNG stream)")
    data_seed: int = Field(
        default=0, description="data-order RNG stream, shared by the seeds of a job"
    )
    train_tokens: int = Field(gt=0, description="tokens each SAE sees (epochs over the cache)")
    batch_size: int = Field(default=4096, gt=0)
    shuffle_tokens: int = Field(
        default=4_194_304,
        gt=0,
        description="rows of the shuffle buffer (part of the data order, sources.py): activations "
        "that fit it are read once and kept on the training device",
    )
    save_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="dtype of the saved SAE weights (trained in float32 either way): float16 "
        "halves a study's largest artifact at ~5e-4 relative rounding (check-config's budget)",
    )
    source: Literal["cache", "stream"] = Field(
        default="cache",
        description="cache: train on activations cached to Parquet (the activations rule writes "
        "train.parquet); stream: run the checkpoint over the token sample inside the train job, "
        "no training cache on disk (streaming.py; the study's scale)",
    )
    split_by_architecture: bool = Field(
        default=False,
        description="one train job and one measure job per (step, layer, architecture) instead of "
        "one per (step, layer), which trains every architecture x seed from one read: for a "
        "device that cannot hold them all, or to retrain one architecture without the others",
    )
    init_tokens: int = Field(
        default=16384, gt=0, description="first training tokens used for data-dependent init"
    )
    lr_warmup_fraction: float = Field(default=0.01, ge=0, le=1)
    lr_decay_fraction: float = Field(
        default=0.2, ge=0, le=1, description="linear decay to 0 at the end"
    )
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), strict=False)  # list -> tuple
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    input_scaling: Literal["expected_norm", "centred", "none"] = Field(
        default="expected_norm",
        description="expected_norm: E|x| = sqrt(d) (SAELens); centred: E|x - E x|^2 = d, so that "
        "sparsity penalties weigh the same signal across checkpoints whose mean offset differs; "
        "folded into the weights at save",
    )
    log_every: int = Field(default=10, gt=0, description="optimiser steps between loss-curve rows")
    checkpoint_tokens: int | None = Field(
        default=10_000_000,
        gt=0,
        description="training tokens between resume checkpoints (rounded down to whole batches): "
        "a killed train job restarts from the last one; None: no checkpoints",
    )
    threads: int | None = Field(
        default=None, gt=0, description="torch CPU threads; None: the rule's"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast for the matmuls on a GPU (fp32 master weights and Adam "
        "state, TF32 allowed), fp32 on CPU",
    )
    deterministic: bool = Field(
        default=False,
        description="torch deterministic algorithms (and a fixed cuBLAS workspace): on a GPU the "
        "same seed then gives the same SAE on the same device and software, at some speed cost; "
        "CPU runs are bitwise reproducible either way",
    )
    sparse_path: Literal["auto", "sparse", "dense"] = Field(
        default="auto",
        description="products over the non-zero codes of top-k SAEs (saes/sparse.py); auto: where "
        "they are sparse enough to be faster (CPU)",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(
                "seeds must hold at least two distinct seeds (seed consistency compares them)"
            )
        if any(s < 0 for s in v):
            raise ValueError(f"seeds {v} must be >= 0 (each names a folder seed<s>)")
        return v

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"adam_betas {list(v)} must both be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _schedule(self) -> TrainingConfig:
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ValueError(
                f"training.lr_warmup_fraction {self.lr_warmup_fraction} + lr_decay_fraction "
                f"{self.lr_decay_fraction} must be <= 1 (the warm-up would overlap the decay)"
            )
        if self.batch_size > self.train_tokens:
            raise ValueError(
                f"training.batch_size {self.batch_size} must be <= train_tokens {self.train_tokens}"
            )
        return self


class MetricsConfig(StrictModel):
    batch_size: int = Field(default=4096, gt=0)
    shared_threshold: float = Field(default=0.7, gt=0, le=1, description="Paulo & Belrose: 0.7")
    null_draws: int = Field(
        default=2, gt=0, description="random-dictionary draws for the null baseline"
    )
    null_seed: int = 0
    splice_positions: Literal["trained", "all"] = Field(
        default="trained",
        description="splice reconstructions at the positions the SAEs were trained on (position 0 "
        "excluded when activations.drop_first_position) or at every position",
    )
    splice_batch_sequences: int = Field(default=16, gt=0, description="sequences per LM forward")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ValidationConfig(StrictModel):
    """The metrics against known ground truth, on toy models (toy.py), at every run."""

    # Toy models of superposition (Elhage et al. 2022; Bereska et al. 2025 section 5.1). The defaults
    # are a reduced setting that runs in seconds; `ValidationConfig.paper_superposition()` (toy.py
    # PAPER_SUPERPOSITION) is the paper's, and the validation JSON states which one ran.
    toy_models: int = Field(default=20, ge=3, description="models in the feature-sparsity sweep")
    toy_features: int = Field(default=20, gt=0, description="M input features of each toy model")
    toy_hidden: int = Field(default=5, gt=0, description="N hidden neurons (N < M: superposition)")
    toy_importance_decay: float = Field(default=0.7, gt=0, le=1, description="importance 0.7^i")
    toy_min_density: float = Field(default=0.001, gt=0, le=1, description="sweep: 1 - S from here")
    toy_max_density: float = Field(default=0.999, gt=0, le=1, description="... to here")
    toy_steps: int = Field(default=3000, gt=0, description="AdamW steps per toy model (paper 10^4)")
    toy_batch: int = Field(default=256, gt=0, description="toy-model batch (Elhage et al.: 1024)")
    toy_lr: float = Field(default=3e-3, gt=0, description="toy AdamW lr (Elhage et al.: 1e-3)")
    toy_weight_decay: float = Field(default=0.01, ge=0, description="AdamW's (PyTorch default)")
    toy_samples: int = Field(default=10_000, gt=0, description="hidden activations per toy model")
    toy_sae_expansion: int = Field(default=8, gt=0, description="tied SAE latents / N (paper: 8)")
    toy_sae_l1: float = Field(default=0.1, ge=0, description="tied SAE L1 coefficient (paper: 0.1)")
    toy_sae_loss: Literal["eq5", "code"] = Field(
        default="eq5",
        description="eq5: the paper's eq. 5, |h - h'|^2 + l1 |z|_1 per sample; code: the "
        "authors' sae.py, mean squared error + l1 mean |z| over all elements",
    )
    toy_sae_lr: float = Field(default=1e-3, gt=0, description="tied SAE Adam lr (paper: 1e-3)")
    toy_sae_batch: int = Field(default=512, gt=0, description="tied SAE batch (paper: 128)")
    toy_sae_epochs: int = Field(default=150, gt=0, description="tied SAE epochs, max (paper: 800)")
    toy_sae_patience: int = Field(
        default=0, ge=0, description="early stopping on the epoch's training loss (paper 10; 0 off)"
    )
    # The model organism of seed consistency (Song, Muhamed et al. 2025 section 1.4)
    organism_latents: int = Field(default=32, gt=0, description="true dictionary size m")
    organism_dims: int = Field(default=16, gt=0, description="n")
    organism_k: int = Field(default=3, gt=0, description="active latents per sample")
    organism_samples: int = Field(default=50_000, gt=0)
    organism_seeds: list[int] = Field(default=[0, 1, 2], min_length=2)
    organism_tokens: int = Field(default=1_000_000, gt=0, description="training tokens per SAE")
    organism_batch: int = Field(default=1024, gt=0)
    seed: int = 0

    @field_validator("organism_seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"organism_seeds {v} must be distinct seeds >= 0")
        return v

    @model_validator(mode="after")
    def _density_range(self) -> ValidationConfig:
        if self.toy_min_density > self.toy_max_density:
            raise ValueError(
                f"toy_min_density {self.toy_min_density} > toy_max_density {self.toy_max_density}"
            )
        return self

    @staticmethod
    def paper_superposition_settings() -> dict:
        """The toy fields in Bereska et al. 2025's setting (section 5.1, arXiv 2512.13568; blog).

        Paper: 100 models, S in [0.001, 0.999], M = 20 -> N = 5, importance 0.7^i, 10,000 samples,
        SAE 8x with l1 0.1 in the loss of its eq. 5, ||x - x'||^2 + l1 ||z||_1 (the authors'
        `compute_loss` averages both over elements instead: toy_sae_loss "code"). The authors'
        `train_sae` (experiments/adversarial/sae.py): Adam lr
        1e-3, batch 128, <= 800 epochs, patience 10. "Following Elhage et al. ... trained to
        convergence": their notebook's AdamW, lr 1e-3, batch 1024, 10,000 steps.
        """
        return {
            "toy_models": 100,
            "toy_features": 20,
            "toy_hidden": 5,
            "toy_importance_decay": 0.7,
            "toy_min_density": 0.001,
            "toy_max_density": 0.999,
            "toy_steps": 10_000,
            "toy_batch": 1024,
            "toy_lr": 1e-3,
            "toy_weight_decay": 0.01,
            "toy_samples": 10_000,
            "toy_sae_expansion": 8,
            "toy_sae_l1": 0.1,
            "toy_sae_loss": "eq5",
            "toy_sae_lr": 1e-3,
            "toy_sae_batch": 128,
            "toy_sae_epochs": 800,
            "toy_sae_patience": 10,
        }

    @classmethod
    def paper_superposition(cls, **overrides) -> ValidationConfig:
        """This config in Bereska et al.'s toy setting (other fields at their defaults)."""
        return cls(**{**cls.paper_superposition_settings(), **overrides})


class FiguresConfig(StrictModel):
    formats: list[Literal["png", "pdf", "svg"]] = Field(default=["png", "pdf"], min_length=1)
    dpi: int = Field(default=200, gt=0)


class ExplorerConfig(StrictModel):
    """The static feature explorer (explorer/site.py): what each latent page shows."""

    latents: int = Field(
        default=1024,
        gt=0,
        description="latents given pages per (layer, architecture): all when the SAE has no more, "
        "else a seeded uniform sample of the final SAE's latents",
    )
    sample_seed: int = 0
    contexts: int = Field(default=10, gt=0, description="max-activating eval contexts per step")
    context_before: int = Field(default=12, ge=0, description="tokens shown before the max token")
    context_after: int = Field(default=4, ge=0, description="tokens shown after it")
    logit_tokens: int = Field(default=10, gt=0, description="promoted and suppressed tokens each")
    histogram_bins: int = Field(default=24, gt=1)
    batch_size: int = Field(default=4096, gt=0, description="eval tokens encoded at a time")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ContainersConfig(StrictModel):
    main: str = Field(
        default="containers/saedynamics-0.1.0.sif",
        description="image for every rule with --use-apptainer (a .sif path, docker:// or oras://)",
    )


# ---- the study -----------------------------------------------------------------------------------


class StudyConfig(StrictModel):
    study: str = Field(pattern=SLUG, description="results go to <results>/<study>/")
    results: str = "results"
    corpus: CorpusConfig = CorpusConfig()
    tokens: TokensConfig = TokensConfig()
    model: ModelConfig
    activations: ActivationsConfig
    training: TrainingConfig
    architectures: dict[str, SerializeAsAny[ArchitectureConfig]]
    metrics: MetricsConfig = MetricsConfig()
    validation: ValidationConfig = ValidationConfig()
    figures: FiguresConfig = FiguresConfig()
    explorer: ExplorerConfig = ExplorerConfig()
    containers: ContainersConfig = ContainersConfig()

    @field_validator("results")
    @classmethod
    def _results(cls, v: str) -> str:
        """Any folder the user names (absolute, relative, outside the checkout: it is their disk);
        refused is only what would put the results somewhere else than that folder."""
        if not v:
            raise ValueError("must name a folder ('' would put the results at the filesystem root)")
        if v.startswith("~"):
            raise ValueError(f"{v!r}: '~' is not expanded; write the home folder out")
        if not re.fullmatch(r"[\w./+@,%=-]+", v):
            raise ValueError(
                f"{v!r}: a folder of letters, digits and . / _ - + @ , % = only (Snakemake reads "
                "braces as wildcards, and the rules pass paths to shell commands unquoted)"
            )
        return v

    @field_validator("architectures", mode="before")
    @classmethod
    def _architectures(cls, raw: Any) -> dict[str, ArchitectureConfig]:
        """Validate each entry against the hyperparameters of its registered architecture."""
        if not isinstance(raw, dict) or not raw:
            raise ValueError(
                "architectures must be a non-empty mapping name -> {architecture: ...}"
            )
        out = {}
        for name, entry in raw.items():
            if not isinstance(name, str) or not re.match(SLUG, name):
                raise ValueError(
                    f"architecture name {name!r} must match {SLUG} (it becomes a folder)"
                )
            if isinstance(entry, ArchitectureConfig):
                out[name] = entry
                continue
            if not isinstance(entry, dict) or "architecture" not in entry:
                raise ValueError(f"architectures.{name} needs a key 'architecture'")
            kind = entry["architecture"]
            if kind not in REGISTRY:
                raise ValueError(
                    f"architectures.{name}.architecture: {kind!r} is not registered; "
                    f"allowed: {', '.join(sorted(REGISTRY))}"
                )
            arch_cfg = REGISTRY[kind].Config
            try:
                out[name] = arch_cfg.model_validate(entry)
            except ValidationError as e:
                raise ValueError(
                    format_errors(e, prefix=f"architectures.{name}", model=arch_cfg, bullet=False)
                ) from None
        return out

    @model_validator(mode="after")
    def _dimensions(self) -> StudyConfig:
        n_layers = self.model.num_layers
        bad = [layer for layer in self.activations.layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(
                f"activations.layers {bad}: the model has {n_layers} layers, so layers must be in "
                f"0..{n_layers - 1}"
            )
        if not self.activations.layers or len(set(self.activations.layers)) != len(
            self.activations.layers
        ):
            raise ValueError("activations.layers must be a non-empty list of distinct layers")
        if not self.model.steps or len(set(self.model.steps)) != len(self.model.steps):
            raise ValueError("model.steps must be a non-empty list of distinct steps")
        for name, arch in self.architectures.items():
            try:
                arch.check_dimensions(self.model.d_model, self.training.n_latents)
            except ValueError as e:
                raise ValueError(f"architectures.{name}: {e}") from None
        return self

    # ---- derived --------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"{self.results}/{self.study}"

    def stage_settings(self, stage: str, architecture: str | None = None) -> dict[str, Any]:
        """The config slice a stage depends on, as JSON-able data (see the module docstring)."""
        dump = self.model_dump(mode="json")
        common = {"study": self.study}
        slices = {
            "tokens": ["corpus", "tokens", "model"],
            "checkpoint": ["model"],
            "micro_lm": ["model", "tokens"],
            "activations": ["model", "activations"],
            "train": ["training"],
            "measure": ["metrics"],
            "splice": ["activations", "metrics"],
            "drift": ["metrics"],
            "tables": [],
            "figures": ["figures"],
            "explorer": ["explorer"],
            "validation": ["validation"],
        }
        if stage not in slices:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(slices)}")
        if architecture is not None and architecture not in self.architectures:
            raise ConfigError(
                f"architecture {architecture!r} is not in this config's architectures; it has: "
                f"{', '.join(self.architectures)}"
            )
        out = common | {key: dump[key] for key in slices[stage]}
        if stage == "activations":
            needed = set(self.activations.extra_columns)
            for arch in self.architectures.values():
                needed |= set(REGISTRY[arch.architecture].requires)
            out["activations"]["extra_columns"] = sorted(needed)
            # the train split is cached only for training.source cache
            out["splits"] = ["eval"] if self.training.source == "stream" else ["train", "eval"]
        if stage == "train":  # the job's set: one architecture, or all (architecture None)
            names = list(self.architectures) if architecture is None else [architecture]
            out["architectures"] = {name: dump["architectures"][name] for name in names}
            if self.training.source == "stream":  # how the job computes its activations
                out["activations"] = dump["activations"]
                out["activations"]["extra_columns"] = self.stage_settings("activations")[
                    "activations"
                ]["extra_columns"]
                out["model"] = dump["model"]
        return out


# ---- loading and error messages --------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict:
    """A config file's mapping, unvalidated; ConfigError naming the file if it is unreadable, not
    YAML (a bad encoding included) or not a mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes())  # bytes: a bad encoding is a YAMLError too
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = [getattr(e, "context", None), getattr(e, "problem", None)]
        problem = "; ".join(filter(None, what)) or " ".join(str(e).split())
        raise ConfigError(f"config file {path} is not valid YAML: {where}{problem}") from None
    _require_mapping(raw, str(path))
    return raw


def _require_mapping(raw: Any, name: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{name}: expected a mapping of keys at the top level, got "
            + ("nothing (the file is empty)" if raw is None else type(raw).__name__)
        )


def load_config(source: str | Path | dict, name: str | None = None) -> StudyConfig:
    """Validate a config file (or an already-parsed dict); raise ConfigError naming the problem."""
    if isinstance(source, dict):
        raw, name = source, name or "the config"
        _require_mapping(raw, name)
    else:
        raw, name = read_config_file(source), name or str(source)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(
            f"invalid configuration in {name}:\n{format_errors(e, model=StudyConfig)}"
        ) from None


def coerce_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """`raw` (a config with Snakemake's `--config KEY=VALUE` overrides merged in) with the values
    the command line set read as the numbers, booleans or nulls the schema wants there.

    Snakemake parses a top-level VALUE as a number where it can, but the values inside one
    (`--config 'training={n_latents: 32}'`) with YAML's BaseLoader, which leaves every scalar a
    string: '32', 'true', 'null'. Only those keys (`overrides`, as Snakemake parsed them) are
    read, and only where the schema's type is a number, a bool or optional; a config file keeps
    strict types, and a string that is no number stays one, so validation names the key and the
    type it wants.
    """
    out = copy.deepcopy(raw)
    _coerce_fields(out, overrides, StudyConfig)
    return out


def _coerce_fields(data: Any, overrides: Any, model) -> None:
    if not isinstance(data, dict) or not isinstance(overrides, Mapping):
        return
    fields = getattr(model, "model_fields", {})
    for key, over in overrides.items():
        if key not in data:
            continue
        if model is StudyConfig and key == "architectures":  # each entry: its own schema
            for name, entry_over in over.items() if isinstance(over, Mapping) else ():
                entry = data[key].get(name) if isinstance(data[key], dict) else None
                kind = entry.get("architecture") if isinstance(entry, dict) else None
                if isinstance(kind, str) and kind in REGISTRY:
                    _coerce_fields(entry, entry_over, REGISTRY[kind].Config)
        elif key in fields:
            data[key] = _coerce_value(data[key], over, fields[key].annotation)


def _coerce_value(value: Any, over: Any, annotation: Any) -> Any:
    if isinstance(over, Mapping):
        _coerce_fields(value, over, _submodel(annotation, value))
        return value
    if isinstance(over, list) and isinstance(value, list):
        items = [a for a in _members(annotation) if get_origin(a) in (list, tuple)]
        item = next((get_args(a)[0] for a in items if get_args(a)), None)
        return [_coerce_scalar(v, item) for v in value] if item is not None else value
    return _coerce_scalar(value, annotation)


def _members(annotation: Any) -> tuple:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _submodel(annotation: Any, value: Any):
    """The config model at a key: the one of a union whose Literal fields (`source`) match."""
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    for m in models:
        tags = {k: get_args(f.annotation) for k, f in m.model_fields.items()}
        tags = {
            k: v for k, v in tags.items() if get_origin(m.model_fields[k].annotation) is Literal
        }
        if len(models) == 1 or (
            isinstance(value, dict) and tags and all(value.get(k) in v for k, v in tags.items())
        ):
            return m
    return None


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if not isinstance(value, str):
        return value
    kinds, text = _members(annotation), value.strip()
    if type(None) in kinds and text.lower() in ("null", "none", "~"):
        return None
    if bool in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            number = yaml12_number(text)  # '5e7'
            if isinstance(number, int) and float not in kinds:
                return number
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            pass
    return value


def format_errors(error: ValidationError, prefix: str = "", model=None, bullet: bool = True) -> str:
    """A pydantic ValidationError as one line per error, `key.path: what is wrong` (bulleted
    unless `bullet` is False), with the key path under `prefix`. `model` (the validated pydantic
    model): for an unknown key, the keys allowed there and the closest one."""
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        # discriminated unions put the tag into the path ("model.hub.steps"): drop it
        if len(loc) > 1 and loc[0] == "model" and loc[1] in ("hub", "micro"):
            loc = [loc[0], *loc[2:]]
        key = ".".join(filter(None, [prefix, *loc]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc[-1] == "trust_remote_code":
            msg = (
                "refused: saedynamics never runs code from a model or dataset repository "
                "(trust_remote_code is always off); remove the key"
            )
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key"
            if allowed and (not close or len(allowed) <= 16):  # a long list only when needed
                msg += f"; allowed keys here: {', '.join(allowed)}"
            msg += f" (did you mean {close[0]!r}?)" if close else ""
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "union_tag_invalid":
            msg = "model.source must be 'hub' or 'micro'"
        elif err["type"] == "string_pattern_mismatch" and err["ctx"]["pattern"] == SLUG:
            msg = (
                f"{err['input']!r} must be lower-case letters, digits, '_', '.' or '-', starting "
                "with a letter or digit (it becomes a folder name)"
            )
        elif err["type"] != "value_error" and isinstance(err["input"], (str, int, float)):
            found = repr(err["input"])  # a wrong type or value: say what was found
            msg += f" (got {found if len(found) <= 40 else found[:37] + '...'})"
        if msg.startswith((f"{key}.", f"{key}:", f"{key} ")) or not key:
            line = msg  # the message already names its key (nested validators)
        else:
            line = f"{key}: {msg}"
        lines.append(f"  - {line}" if bullet else line)
    return "\n".join(lines)


def _allowed_keys(model, loc) -> list[str]:
    """The field names of the (nested) model at `loc`, for 'unknown key' messages."""
    for part in loc:
        if model is None:
            return []
        field = getattr(model, "model_fields", {}).get(part)
        if field is not None:
            model = _model_of(field.annotation)
        else:  # a discriminated union's tag
            model = {"hub": HubModelConfig, "micro": MicroModelConfig}.get(part)
    return sorted(getattr(model, "model_fields", {})) if model is not None else []


def _model_of(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None
