"""The splice stage: CE-loss recovered and KL score of every SAE of one (step, layer), spliced into
its LM at that layer on the eval token windows (`metrics.reconstruction.spliced_scores`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from saedynamics.artifacts import write_json
from saedynamics.checkpoints import load_model
from saedynamics.corpus import read_token_sample
from saedynamics.errors import DataError
from saedynamics.hooks import block_modules
from saedynamics.inputs import check_d_in, seed_dirs
from saedynamics.metrics.reconstruction import spliced_scores
from saedynamics.resources import resolve_device
from saedynamics.saes import load

log = logging.getLogger("saedynamics")


def splice(
    metrics,
    activations,
    checkpoint: str,
    tokens: Path,
    saes: list[Path],
    out: Path,
    *,
    study: str,
    step: int,
    layer: int,
    provenance: dict,
) -> None:
    """Score the SAEs of the architecture dirs `saes` (validated MetricsConfig `metrics` and
    ActivationsConfig `activations`) in the LM `checkpoint`; write the JSON file `out`."""
    device = resolve_device(metrics.device)
    # the SAEs and tokens first: they are cheap to load, and a bad one fails before the LM loads
    by_dir = {d: load(d) for arch_dir in map(Path, saes) for d in seed_dirs(arch_dir)}
    _, windows = read_token_sample(Path(tokens), "eval")
    model = load_model(checkpoint)  # verified against its manifest first
    check_d_in(by_dir, model.config.hidden_size, f"{checkpoint} (config.json)")
    if layer >= len(block_modules(model)):
        raise DataError(
            f"{checkpoint}: the model has {len(block_modules(model))} layers; "
            f"layer {layer} does not exist"
        )
    model = model.to(device)
    on_device, identity = {}, {}
    for seed_dir, sae in by_dir.items():
        key = (seed_dir.parent.name, sae.provenance["seed"])
        on_device[key] = sae.to(device)
        identity[key] = {
            "architecture": seed_dir.parent.name,
            "architecture_type": sae.architecture,
            "architecture_title": sae.title or sae.architecture,
            "seed": sae.provenance["seed"],
        }
    first = 1 if activations.drop_first_position and metrics.splice_positions == "trained" else 0
    block = block_modules(model)[layer]
    scores_of = spliced_scores(
        model,
        block,
        torch.from_numpy(windows.astype("int64")),
        on_device,
        first,
        metrics.splice_batch_sequences,
    )
    for key, scores in scores_of["saes"].items():
        log.info(
            "%s seed %s: CE recovered %.3f, KL score %.3f",
            *key,
            scores["ce_loss_score"],
            scores["kl_score"],
        )
    if (reason := next(iter(scores_of["saes"].values()))["ce_loss_score_reason"]) is not None:
        log.warning("CE recovered and KL score are undefined (NaN): %s", reason)
    write_json(
        out,
        {
            "study": study,
            "step": step,
            "layer": layer,
            "first_position": first,
            **{k: scores_of[k] for k in ("ce_orig", "ce_zero", "kl_zero", "n_tokens")},
            "saes": [identity[key] | scores for key, scores in scores_of["saes"].items()],
        },
        provenance,
    )
