"""What stages check of their inputs before any compute: an activation file is the one of the
job's (step, layer), the SAEs take inputs of the activations' width, the seed directories exist;
and the train stage's source of activations (the cached file, or the checkpoint streamed)."""

from __future__ import annotations

from pathlib import Path

from saedynamics.errors import ConfigError, DataError, SaedynamicsError


def checked_activation_file(path, step: int, layer: int):
    """The activation file of a (step, layer) job, verified once (its checksum) and checked to be
    that step's and layer's, before any compute."""
    from saedynamics.activations import ActivationFile

    acts = ActivationFile(path)
    found = {k: acts.metadata.get(k) for k in ("step", "layer")}
    if found != {"step": step, "layer": layer}:
        raise DataError(
            f"{acts.path}: holds the activations of step {found['step']}, layer {found['layer']} "
            f"(its metadata), not of step {step}, layer {layer} as this job was asked; "
            "rerun the activations rule"
        )
    return acts


def check_d_in(saes: dict, d_model: int, what: str) -> None:
    """Every SAE (path -> SAE) must take inputs of `what`'s width d_model."""
    wrong = {str(path): sae.d_in for path, sae in saes.items() if sae.d_in != d_model}
    if wrong:
        raise DataError(
            f"{what} has d_model {d_model}, but the SAEs in "
            + ", ".join(f"{path} have d_in {d}" for path, d in wrong.items())
            + " (cfg.json); they were trained on other activations: rerun the train rule"
        )


def seed_dirs(saes_dir: Path) -> list[Path]:
    """The seed<s>/ SAE directories of one architecture's directory, by seed."""
    dirs = sorted(Path(saes_dir).glob("seed*/"), key=lambda p: int(p.name.removeprefix("seed")))
    if not dirs:
        raise SaedynamicsError(f"{saes_dir}: no seed*/ SAE directories; run the train rule")
    return dirs


def training_source(
    training,
    settings: dict,
    step: int,
    layer: int,
    activations: str | None,
    checkpoint: str | None,
    tokens: str | None,
    eval: str | None,
):
    """The train stage's batches: with training.source cache, the `activations` file
    (train.parquet); with stream, the checkpoint run over the token sample, checked against the
    layer's `eval` cache (whose norm statistics give the input scale). `settings`: the stage's
    config slice (its activations and model slices are validated for stream)."""
    if training.source == "stream":
        return _stream_source(training, settings, step, layer, checkpoint, tokens, eval)
    if activations:
        from saedynamics.sources import FileSource

        return FileSource(checked_activation_file(activations, step, layer))
    raise ConfigError("training.source is 'cache': give --activations (train.parquet)")


def _stream_source(training, settings, step, layer, checkpoint, tokens, eval):
    from saedynamics.config import ActivationsConfig, ModelConfig
    from saedynamics.resources import resolve_device
    from saedynamics.settings import validate
    from saedynamics.streaming import StreamSource

    given = {"checkpoint": checkpoint, "tokens": tokens, "eval": eval}
    missing = [f"--{n}" for n, v in given.items() if not v]
    if missing:
        raise ConfigError(f"training.source is 'stream': give {', '.join(missing)}")
    cfg = validate(ActivationsConfig, settings["activations"], "activations")
    model = validate(ModelConfig, settings["model"], "model")
    return StreamSource(
        Path(checkpoint),
        Path(tokens),
        layer,
        checked_activation_file(eval, step, layer),
        cfg,
        resolve_device(training.device),
        cache_dir=getattr(model, "cache_dir", None),
    )
