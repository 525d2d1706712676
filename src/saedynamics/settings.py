"""A stage's settings: its config slice read (from `--settings` JSON or a whole study config) and
validated, one slice at a time, before any work. The CLI calls these; every stage function then
takes validated config objects."""

from __future__ import annotations

import json

from pydantic import TypeAdapter, ValidationError

from saedynamics.errors import ConfigError


def read_settings(config: str | None, settings: str | None, stage: str) -> dict:
    """The stage's config slice: `StudyConfig.stage_settings` of the study config file `config`,
    or else the JSON object `settings` (what the rules pass)."""
    from saedynamics.config import load_config

    if config:
        return load_config(config).stage_settings(stage)
    try:
        out = json.loads(settings)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--settings is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ConfigError(
            f"--settings must be a JSON object (the stage's config slice), got {type(out).__name__}"
        )
    return out


def validate(model, data, key: str):
    """Validate one slice (`key` names it in errors) with a pydantic model or type."""
    from saedynamics.config import format_errors

    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"invalid settings:\n{format_errors(e, prefix=key)}") from None


def select_architecture(architectures: dict | None, only: str, where: str) -> dict:
    """The train stage's set of one: the settings of the architecture `only` (`where` names the
    settings' source in errors), as `StudyConfig.stage_settings` gives them for it."""
    have = architectures or {}
    if only not in have:
        raise ConfigError(
            f"--architecture {only!r} is not in the architectures of "
            f"{where}; it has: {', '.join(have) or 'none'}"
        )
    return {only: have[only]}


def train_settings(settings: dict, only: str | None, where: str) -> tuple:
    """(training config, {name: architecture config}) of the train stage's `settings`, validated
    in this order: the architecture `only` chosen (None: all; `where` names the settings' source
    in errors), the training slice, each architecture."""
    from saedynamics.config import TrainingConfig

    architectures = settings.get("architectures")
    if only is not None:
        architectures = select_architecture(architectures, only, where)
    training = validate(TrainingConfig, settings["training"], "training")
    return training, architecture_configs(architectures)


def architecture_configs(architectures: dict) -> dict:
    """{name: validated architecture config} of the settings' architectures."""
    from saedynamics.saes import REGISTRY

    out = {}
    for name, raw in architectures.items():
        kind = raw.get("architecture")
        if kind not in REGISTRY:
            raise ConfigError(
                f"architectures.{name}.architecture: {kind!r} is not registered; allowed: "
                f"{', '.join(sorted(REGISTRY))}"
            )
        out[name] = validate(REGISTRY[kind].Config, raw, f"architectures.{name}")
    return out


# the slices each stage's command validates before any work, in order: (key, model in config.py);
# the train stage validates its own (its --architecture is checked first)
SLICES = {
    "tokens": [("corpus", "CorpusConfig"), ("tokens", "TokensConfig"), ("model", "ModelConfig")],
    "checkpoint": [("model", "HubModelConfig")],
    "micro_lm": [("model", "MicroModelConfig")],
    "activations": [("activations", "ActivationsConfig"), ("model", "ModelConfig")],
    "train": [],
    "measure": [("metrics", "MetricsConfig")],
    "splice": [("metrics", "MetricsConfig"), ("activations", "ActivationsConfig")],
    "drift": [("metrics", "MetricsConfig")],
    "tables": [],
    "validation": [("validation", "ValidationConfig")],
    "figures": [("figures", "FiguresConfig")],
    "explorer": [("explorer", "ExplorerConfig")],
}


def validate_slices(settings: dict, stage: str) -> dict:
    """{key: validated config} of the slices `SLICES[stage]` of the stage's `settings`."""
    from saedynamics import config

    return {
        key: validate(getattr(config, model), settings[key], key) for key, model in SLICES[stage]
    }
