# Shared by every rule: the validated config, the result paths, and the command that runs a stage.
import json
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the package, also when not installed

from saedynamics.config import load_config
from saedynamics.errors import ConfigError
from saedynamics.figures import FIGURES, VALIDATION_FIGURES
from saedynamics.tables import TABLES

# --configfile on the command line replaces the embedded demo default instead of merging into it
# (Snakemake deep-merges dicts, which would add the demo's architectures to a study).
_raw = workflow.config_settings.overwrite_config if workflow.overwrite_configfiles else config
try:
    CFG = load_config(
        dict(_raw),
        name=", ".join(map(str, workflow.overwrite_configfiles)) or "workflow/configs/demo.yaml",
    )
except ConfigError as e:
    raise WorkflowError(str(e)) from None

R = CFG.root
STEPS = CFG.model.steps
LAYERS = CFG.activations.layers
ARCHITECTURES = list(CFG.architectures)
SEEDS = CFG.training.seeds
SAE_FILES = ["cfg.json", "sae_weights.safetensors", "training.parquet"]
METRICS = ["reconstruction", "consistency", "superposition"]
FIGURE_FILES = expand(f"{R}/figures/{{name}}.{{fmt}}", name=FIGURES, fmt=CFG.figures.formats)


def settings(stage):
    """A params function: the config slice the stage depends on, as JSON. A change to it re-runs
    the stage and its consumers. (A function, so that Snakemake does not read braces in it.)"""
    return lambda wc: json.dumps(
        CFG.stage_settings(stage, getattr(wc, "architecture", None)), sort_keys=True
    )


def parent(n=1, of="output"):
    """A params function: the directory n levels above the first input or output file."""
    return lambda wildcards, input, output: Path((input if of == "input" else output)[0]).parents[
        n - 1
    ]


def sae_files(step, layer, architecture):
    return expand(
        f"{R}/saes/step{step}/layer{layer}/{architecture}/seed{{seed}}/{{file}}",
        seed=SEEDS,
        file=SAE_FILES,
        allow_missing=True,
    )
