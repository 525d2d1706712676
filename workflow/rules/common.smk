# Shared by every rule: the validated config, the result paths, and the command that runs a stage.
import json
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the package, also when not installed

from saedynamics.config import coerce_overrides, load_config
from saedynamics.errors import ConfigError
from saedynamics.figures import FIGURES, VALIDATION_FIGURES
from saedynamics.tables import TABLES

# --configfile on the command line replaces the embedded demo default instead of merging into it
# (Snakemake deep-merges dicts, which would add the demo's architectures to a study).
_raw = workflow.config_settings.overwrite_config if workflow.overwrite_configfiles else config
_name = ", ".join(map(str, workflow.overwrite_configfiles)) or "workflow/configs/demo.yaml"
if workflow.config_settings.config:
    _name += " with --config " + " ".join(workflow.config_settings.config_args or [])
# --config values nested in a mapping (training='{n_latents: 32}') reach us as strings: read them
# as the numbers, booleans or nulls the schema wants at those keys (config files stay strict)
_raw = coerce_overrides(dict(_raw), workflow.config_settings.config)
try:
    CFG = load_config(_raw, name=_name)
except ConfigError as e:
    raise WorkflowError(str(e)) from None


def export_run_environment():
    """Environment every job inherits from this (submitting) process: local jobs and SLURM jobs
    (`--export=ALL`) get it, and Apptainer passes the host environment into the container."""
    from snakemake.settings.types import DeploymentMethod

    from saedynamics.artifacts import git_commit

    env = os.environ
    # the commit, found here once: in a container or on a compute node `git` may be missing
    if commit := git_commit():
        env.setdefault("SAEDYNAMICS_GIT_COMMIT", commit)
    if DeploymentMethod.APPTAINER not in workflow.deployment_settings.deployment_method:
        return
    # GPUs reach the container without any flag from the user: APPTAINER_NV is apptainer's own
    # environment twin of --nv (a no-op on a machine without a GPU)
    env.setdefault("APPTAINER_NV", "true")
    # Caches in declared host folders, bound at the same path: `apptainer exec --home <checkout>`
    # would otherwise drop ~/.cache/huggingface, ~/.config/matplotlib, ~/.triton into the checkout.
    cache = Path(env.get("SAEDYNAMICS_CACHE", Path.home() / ".cache" / "saedynamics"))
    env.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    env.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    binds = [b for b in env.get("APPTAINER_BIND", "").split(",") if b]
    for var in ("HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)  # apptainer refuses a missing bind
        if env[var] not in binds:
            binds.append(env[var])
    env["APPTAINER_BIND"] = ",".join(binds)


export_run_environment()

R = CFG.root
STEPS = CFG.model.steps
LAYERS = CFG.activations.layers
ARCHITECTURES = list(CFG.architectures)
SEEDS = CFG.training.seeds
STREAM = CFG.training.source == "stream"  # activations computed inside the train jobs
SPLITS = ["eval"] if STREAM else ["train", "eval"]  # the activation caches written
SAE_FILES = ["cfg.json", "sae_weights.safetensors", "training.parquet"]
METRICS = ["reconstruction", "consistency", "superposition"]
FIGURE_FILES = expand(
    f"{R}/figures/{{name}}.{{fmt}}", name=[*FIGURES, *VALIDATION_FIGURES], fmt=CFG.figures.formats
)
EXPLORER = f"{R}/explorer"  # the site; and EXPLORER.html its first page, for the report
EXPLORER_CODE = sorted(
    str(p)
    for p in Path("src/saedynamics/explorer").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
)
VALIDATION_FILES = expand(f"{R}/validation/{{name}}.json", name=["superposition", "organism"])


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


def metric_files(step, layer, architecture):
    return expand(
        f"{R}/metrics/step{step}/layer{layer}/{architecture}/{{metric}}.json",
        metric=METRICS,
        allow_missing=True,
    )


def train_input(wildcards):
    """What a train job reads: its train activations (training.source cache), or the checkpoint,
    the token sample and the layer's eval cache for the input scale (stream)."""
    layer_dir = f"{R}/activations/step{wildcards.step}/layer{wildcards.layer}"
    if STREAM:
        return {
            "checkpoint": f"{R}/checkpoints/step{wildcards.step}",
            "tokens": f"{R}/tokens",
            "eval": f"{layer_dir}/eval.parquet",
        }
    return {"activations": f"{layer_dir}/train.parquet"}


def train_input_args(wildcards, input):
    """The train command's input arguments: --activations, or --checkpoint --tokens --eval."""
    return " ".join(f"--{name} {input[name]}" for name in train_input(wildcards))
