# saedynamics: how do the features that sparse autoencoders find change while a language model trains?
#
#   snakemake --cores all                                        the offline demo (embedded default)
#   snakemake --cores all --use-apptainer --configfile config.yaml   the Pythia study
#
# A --configfile given on the command line replaces the embedded demo config instead of being
# deep-merged into it (see workflow/rules/common.smk); --config KEY=VALUE alone changes the demo.

from pathlib import Path

# Every path of the workflow (configs, src/ for PYTHONPATH and the container, results/) is relative
# to the checkout: `snakemake -s <checkout>/Snakefile` run from elsewhere would look for them there.
if Path(workflow.basedir).resolve() != Path.cwd().resolve():
    raise WorkflowError(
        f"the working directory {Path.cwd()} is not the checkout of this Snakefile "
        f"({Path(workflow.basedir).resolve()}): run from the repository root, or use "
        f"--directory {Path(workflow.basedir).resolve()}"
    )

if not workflow.overwrite_configfiles:  # else Snakemake would report a merge that we undo

    configfile: "workflow/configs/demo.yaml"


include: "workflow/rules/common.smk"


# Every rule runs `PYTHONPATH=src python -m saedynamics <command>`: inside the container the package
# comes from the mounted checkout. The image is used with --use-apptainer (see README).
container: CFG.containers.main


wildcard_constraints:
    step=r"\d+",
    layer=r"\d+",
    seed=r"\d+",
    architecture=r"[a-z0-9][a-z0-9_.\-]*",


include: "workflow/rules/tokens.smk"
include: "workflow/rules/checkpoints.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/validation.smk"
include: "workflow/rules/explorer.smk"


rule all:
    default_target: True
    input:
        FIGURE_FILES,
        EXPLORER,
        f"{EXPLORER}.html",
