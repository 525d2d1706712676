"""`python -m saedynamics <command>`: one subcommand per Snakemake rule.

Each command takes its settings either as `--settings JSON` (what the rules pass: the config slice of
the stage, see `StudyConfig.stage_settings`) or as `--config FILE` (a whole study config, for running
one stage by hand), validates them before any work, and writes its outputs atomically. Errors meant
for the user (bad config, unreadable file, diverged training) print one message and exit 1.
This module only maps arguments to functions: a stage's work is in the module named for it.
`python -m saedynamics snakemake ...` runs the workflow itself (see `snakemake_args`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from saedynamics.artifacts import provenance
from saedynamics.errors import SaedynamicsError
from saedynamics.settings import read_settings, validate_slices

log = logging.getLogger("saedynamics")


# ---- commands: (args, the stage's settings `s`, its validated slices `c`) -> the stage's function


def cmd_check_config(args, s: dict, c: dict) -> None:
    from saedynamics.budget import check_config

    print(check_config(args.path))


def cmd_tokens(args, s: dict, c: dict) -> None:
    from saedynamics.corpus import build_token_sample

    configs, work = (c["corpus"], c["tokens"], c["model"]), Path(args.work) if args.work else None
    out = Path(args.out_tokens), Path(args.out_tokenizer)
    build_token_sample(*configs, *out, provenance=provenance(s), work_dir=work)


def cmd_checkpoint(args, s: dict, c: dict) -> None:
    from saedynamics.checkpoints import download_checkpoint

    earlier = [Path(p) / "manifest.json" if Path(p).is_dir() else Path(p) for p in args.earlier]
    download_checkpoint(c["model"], args.step, Path(args.out), earlier, provenance=provenance(s))


def cmd_micro_lm(args, s: dict, c: dict) -> None:
    from saedynamics.micro_lm import train_micro_suite

    paths = map(Path, (args.tokens, args.tokenizer, args.out_root, args.curve))
    train_micro_suite(c["model"], *paths, provenance=provenance(s))


def cmd_activations(args, s: dict, c: dict) -> None:
    from saedynamics.caching import cache_activations

    paths = map(Path, (args.checkpoint, args.tokens, args.out))
    kw = {"model_cfg": c["model"], "splits": tuple(s.get("splits", ("train", "eval")))}
    cache_activations(c["activations"], *paths, provenance=provenance(s), **kw)


def cmd_train(args, s: dict, c: dict) -> None:
    from saedynamics.inputs import training_source
    from saedynamics.settings import train_settings
    from saedynamics.training import train_saes

    training, archs = train_settings(s, args.architecture, args.config or "--settings")
    paths = (args.activations, args.checkpoint, args.tokens, args.eval)
    source = training_source(training, s, args.step, args.layer, *paths)
    job = {"study": s["study"], "step": args.step, "layer": args.layer}
    resume = Path(args.resume_dir) if args.resume_dir else None
    train_saes(training, archs, source, Path(args.out), job, provenance(s), resume_dir=resume)


def cmd_measure(args, s: dict, c: dict) -> None:
    from saedynamics.measuring import measure

    paths = (args.activations, args.saes, args.architectures, Path(args.out))
    measure(c["metrics"], *paths, **_job(args, s))


def cmd_splice(args, s: dict, c: dict) -> None:
    from saedynamics.splicing import splice

    paths = (args.checkpoint, args.tokens, args.saes, args.out)
    splice(c["metrics"], c["activations"], *paths, **_job(args, s))


def cmd_drift(args, s: dict, c: dict) -> None:
    from saedynamics.drift import drift

    job = {"study": s["study"], "provenance": provenance(s)}
    drift(c["metrics"], args.saes, args.reconstruction, args.out, **job)


def cmd_tables(args, s: dict, c: dict) -> None:
    from saedynamics.tables import collect

    counts = collect([Path(p) for p in args.inputs], Path(args.out), provenance=provenance(s))
    log.info("tables: %s", ", ".join(f"{k} {v} rows" for k, v in counts.items()))


def cmd_validation(args, s: dict, c: dict) -> None:
    from saedynamics.validation import validate_on_toys

    validate_on_toys(c["validation"], args.out, provenance(s))


def cmd_figures(args, s: dict, c: dict) -> None:
    from saedynamics.figures import render_figures

    paths = (args.tables, args.validation, args.out)
    written = render_figures(*paths, c["figures"], provenance(s))
    log.info("figures: %d files in %s", len(written), args.out)


def cmd_explorer(args, s: dict, c: dict) -> None:
    from saedynamics.explorer.site import build_explorer

    paths = (args.saes, args.eval, args.checkpoints, Path(args.tables), Path(args.out))
    front = Path(args.front_page) if args.front_page else None
    build_explorer(
        c["explorer"], *paths, study=s["study"], provenance=provenance(s), front_page=front
    )


def _job(args, s: dict) -> dict:
    return dict(study=s["study"], step=args.step, layer=args.layer, provenance=provenance(s))


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saedynamics", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, func, help, *required: str):
        """A stage's subcommand (--settings or --config, --threads, the `required` flags): its
        add_argument."""
        p = sub.add_parser(name, help=help)
        src = p.add_mutually_exclusive_group(required=True)
        settings = "the stage's config slice as JSON (what the rules pass)"
        src.add_argument("--settings", help=settings)
        src.add_argument("--config", help="a whole study config file (YAML)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.set_defaults(func=func, stage=name.replace("-", "_"))
        for flag in required:  # --step and --layer are ints
            p.add_argument(flag, type=int if flag in ("--step", "--layer") else None, required=True)
        return p.add_argument

    help = (
        "run the workflow: Snakemake's own arguments, every --configfile read first, dotted "
        "--config keys allowed (training.n_latents=32)"
    )
    sub.add_parser("snakemake", help=help, add_help=False)  # main() hands it to snakemake_args
    p = sub.add_parser("check-config", help="validate a study config and summarise it")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config, threads=None, stage=None)

    arg = command("tokens", cmd_tokens, "draw the fixed token sample and its tokenizer")
    arg("--out-tokens", required=True, help="tokens/ (the sample's shards inside)")
    arg("--out-tokenizer", required=True)
    arg(
        "--work",
        help="where the sample is built and a killed job resumes (outside the outputs); "
        "default: a sibling of --out-tokens",
    )

    help = "download one Hub checkpoint (with manifest)"
    arg = command("checkpoint", cmd_checkpoint, help, "--step", "--out")
    arg("--earlier", nargs="*", default=[], help="earlier checkpoint dirs (for duplicates)")

    help = "train the micro suite and save its checkpoints"
    command("micro-lm", cmd_micro_lm, help, "--tokens", "--tokenizer", "--out-root", "--curve")

    help = "cache one checkpoint's activations to Parquet"
    arg = command("activations", cmd_activations, help, "--checkpoint", "--tokens")
    arg("--out", required=True, help="activations/step<N>/ (layer<L>/ written inside)")

    help = "train a set of SAEs of one (step, layer) from one read"
    arg = command("train", cmd_train, help, "--step", "--layer")
    arg(
        "--architecture",
        help="train this architecture alone (default: every one of the config or settings)",
    )
    arg("--activations", help="training.source cache: train.parquet")
    arg("--checkpoint", help="training.source stream: checkpoints/step<N>/")
    arg("--tokens", help="training.source stream: the token sample, tokens/")
    arg("--eval", help="training.source stream: the layer's eval.parquet (input scale)")
    arg("--out", required=True, help="saes/step<N>/layer<L>/ (<architecture>/seed<s>/ inside)")
    arg(
        "--resume-dir",
        help="resume/step<N>/layer<L>/<set>/: checkpoints every training.checkpoint_tokens and a "
        "restart resumes from the last one (outside the outputs); without it, neither",
    )

    help = "reconstruction, consistency and superposition of SAEs of one (step, layer)"
    arg = command("measure", cmd_measure, help, "--step", "--layer")
    arg("--architectures", nargs="+", required=True, help="names in the config's architectures")
    arg("--saes", required=True, help="saes/step<N>/layer<L>/ (<architecture>/ inside)")
    arg("--activations", required=True, help="eval.parquet")
    arg("--out", required=True, help="metrics/step<N>/layer<L>/ (<architecture>/ inside)")

    help = "CE-loss recovered and KL score of the SAEs of one (step, layer)"
    arg = command("splice", cmd_splice, help, "--step", "--layer", "--checkpoint", "--tokens")
    arg("--saes", nargs="+", required=True, help="saes/step<N>/layer<L>/<architecture>/ dirs")
    arg("--out", required=True)

    arg = command("drift", cmd_drift, "decoder drift across checkpoints")
    arg("--saes", nargs="+", required=True, help="every seed's cfg.json")
    arg("--reconstruction", nargs="*", default=[], help="reconstruction.json: the alive latents")
    arg("--out", required=True)

    arg = command("tables", cmd_tables, "collect per-run results into tidy Parquet tables", "--out")
    arg("--inputs", nargs="+", required=True)

    arg = command("validation", cmd_validation, "the metrics against ground truth on toy models")
    arg("--out", required=True, help="validation/ (JSON summaries and figures)")

    arg = command("figures", cmd_figures, "render the figures from the tables", "--tables")
    arg("--validation", help="validation/ of the study: its figures too")
    arg("--out", required=True)

    help = "the static feature explorer: latents across checkpoints and seeds"
    arg = command("explorer", cmd_explorer, help, "--tables", "--out")
    arg("--saes", nargs="+", required=True, help="every SAE's cfg.json")
    arg("--eval", nargs="+", required=True, help="every (step, layer)'s eval.parquet")
    arg("--checkpoints", nargs="+", required=True, help="every checkpoints/step<N>/ directory")
    arg("--front-page", help="also the study's page as one self-contained file (for the report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["snakemake"]:  # Snakemake parses its own arguments
        from saedynamics.snakemake_args import run_snakemake

        return run_snakemake(argv[1:])
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # a rule's log file: keep our own progress, not every library's
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        s = read_settings(args.config, args.settings, args.stage) if args.stage else {}
        args.func(args, s, validate_slices(s, args.stage) if args.stage else {})
    except SaedynamicsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every stage writes through a temporary file renamed into place, removed on failure
        print(
            f"error: {e.filename or 'an output of ' + args.command}: {e.strerror} while writing it; "
            "nothing half-written was kept. Free space on that disk and rerun.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
