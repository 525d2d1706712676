"""What a study costs before it runs: tokens per SAE, disk by kind, FLOPs, GPU-hours.

`python -m saedynamics check-config <config>` prints it. The counts are exact where the config fixes
them (tokens, SAE shapes, jobs); the rest are stated estimates:
- disk: activations float16, extra columns float32, token ids int32, SAE weights in
  `training.save_dtype`, Parquet's overhead ignored (tokens compress, so they take less);
- a train job's resume state: every SAE of its set with its gradients' Adam moments, float32;
- FLOPs per token: an SAE set 6 x (2 d n + 2 n d) per SAE (encoder and decoder, forward and
  backward, as dense products: TopK-sparse decoders cost less); the LM forward to the hooked layer
  24 d^2 + 4 c d per block (c the context length), the whole model and the unembedding 2 V d when an
  extra column needs the logits, twice those above the layer when one needs the LM's gradient;
- time: all FLOPs at `utilisation` of the GPU's dense bf16 peak.
"""

from __future__ import annotations

from saedynamics.config import StudyConfig
from saedynamics.saes import REGISTRY

GPUS = {"H100 SXM": 989e12, "A100": 312e12, "H200": 989e12}  # dense bf16 FLOP/s
PYTHIA_VOCAB = 50304


def study_budget(cfg: StudyConfig, gpu: str = "H100 SXM", utilisation: float = 0.3) -> dict:
    model, tokens, training = cfg.model, cfg.tokens, cfg.training
    d, n_layers, ctx = model.d_model, model.num_layers, tokens.context_length
    vocab = getattr(model, "vocab_size", PYTHIA_VOCAB)
    first = int(cfg.activations.drop_first_position)
    steps, layers = len(model.steps), len(cfg.activations.layers)
    n_arch, n_seeds = len(cfg.architectures), len(training.seeds)
    saes = steps * layers * n_arch * n_seeds
    rows = None if tokens.train_sequences is None else tokens.train_sequences * (ctx - first)
    eval_rows = tokens.eval_sequences * (ctx - first)
    extras = {c for a in cfg.architectures.values() for c in REGISTRY[a.architecture].requires}
    extras |= set(cfg.activations.extra_columns)

    sae_params = 2 * d * training.n_latents + training.n_latents + d  # W_enc, W_dec, biases
    per_job = (1 if training.split_by_architecture else n_arch) * n_seeds  # SAEs a job trains
    save_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[training.save_dtype]
    row_bytes = 2 * d + (4 if "lm_entropy" in extras else 0) + (4 * d if "lm_grad" in extras else 0)
    lm_params = 12 * n_layers * d * d + 2 * vocab * d
    disk = {
        "token sample": None
        if rows is None
        else (tokens.train_sequences + tokens.eval_sequences) * ctx * 4,
        "eval caches": steps * layers * eval_rows * 2 * d,
        "train caches": 0
        if training.source == "stream"
        else (None if rows is None else steps * layers * rows * row_bytes),
        "SAEs": saes * sae_params * save_bytes,
        "resume state (one job at a time)": per_job * sae_params * 4 * 3,
    }
    per_token_sae = n_arch * n_seeds * 12 * d * training.n_latents
    block = 24 * d * d + 4 * ctx * d

    def lm_per_token(layer: int) -> float:
        if not extras:
            return (layer + 1) * block
        whole = n_layers * block + 2 * vocab * d
        above = (n_layers - layer - 1) * block + 2 * vocab * d
        return whole + (2 * above if "lm_grad" in extras else 0)

    lm_mean = sum(lm_per_token(layer) for layer in cfg.activations.layers) / layers
    stream = training.source == "stream"
    sae_flops = steps * layers * training.train_tokens * per_token_sae
    # stream: each job runs the LM over the tokens it trains on; cache: once over the sample
    lm_tokens = training.train_tokens if stream else (rows or 0)
    lm_flops = steps * layers * lm_tokens * lm_mean
    seconds = (sae_flops + lm_flops) / (GPUS[gpu] * utilisation)
    return {
        "saes": saes,
        "jobs": steps * layers * (n_arch if training.split_by_architecture else 1),
        "tokens_per_sae": training.train_tokens,
        "epochs": None if rows is None else training.train_tokens / rows,
        "disk": disk,
        "checkpoints (HF cache)": steps * lm_params * 2,  # Pythia ships float16 weights
        "flops": {"SAE sets": sae_flops, "LM forward passes": lm_flops},
        "lm_share": lm_flops / (sae_flops + lm_flops),
        "gpu": gpu,
        "utilisation": utilisation,
        "gpu_hours": seconds / 3600,
    }


def format_budget(budget: dict) -> str:
    """The budget as the table check-config prints (and the README shows)."""

    def gb(n: float | None) -> str:
        if n is None:
            return "unknown (all windows of the corpus)"
        return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"

    epochs = budget["epochs"]
    disk = budget["disk"]
    total = sum(v for k, v in disk.items() if v is not None)
    lines = [
        f"  training   {budget['tokens_per_sae']:,} tokens per SAE"
        + (f", {epochs:.2f} epochs of the sample" if epochs is not None else "")
        + f"; {budget['saes']:,} SAEs in {budget['jobs']} train jobs",
        *(f"  disk       {name:34s} {gb(size)}" for name, size in disk.items()),
        f"  disk       {'total (the results folder)':34s} {gb(total)}",
        f"  disk       {'LM checkpoints (HF cache: outside)':34s} {gb(budget['checkpoints (HF cache)'])}",
        *(f"  compute    {name:34s} {flops:.2e} FLOP" for name, flops in budget["flops"].items()),
        f"  compute    {'LM share of the FLOPs':34s} {100 * budget['lm_share']:.1f}%",
        f"  time       about {budget['gpu_hours']:,.0f} GPU-hours on one {budget['gpu']} at "
        f"{100 * budget['utilisation']:.0f}% of its dense bf16 peak",
    ]
    return "\n".join(lines)


def check_config(path) -> str:
    """The check-config command's report: the study config `path` validated, its size and its
    budget (`format_budget`)."""
    from saedynamics.config import load_config

    cfg = load_config(path)
    return (
        f"{path}: valid; study {cfg.study!r}, {len(cfg.model.steps)} steps x "
        f"{len(cfg.activations.layers)} layers x {len(cfg.architectures)} architectures x "
        f"{len(cfg.training.seeds)} seeds, training.source {cfg.training.source}\n"
        + format_budget(study_budget(cfg))
    )
