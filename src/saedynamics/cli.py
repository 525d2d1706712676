"""`python -m saedynamics <command>`: one subcommand per Snakemake rule.

Each command takes its settings either as `--settings JSON` (what the rules pass: the config slice of
the stage, see `StudyConfig.stage_settings`) or as `--config FILE` (a whole study config, for running
one stage by hand), validates them before any work, and writes its outputs atomically. Errors meant
for the user (bad config, unreadable file, diverged training) print one message and exit 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from saedynamics.errors import ConfigError, DataError, SaedynamicsError

log = logging.getLogger("saedynamics")


# ---- settings ---------------------------------------------------------------------------------------


def _settings(args, stage: str) -> dict:
    from saedynamics.config import load_config

    if args.config:
        return load_config(args.config).stage_settings(stage)
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--settings is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"--settings must be a JSON object (the stage's config slice), got {type(settings).__name__}"
        )
    return settings


def _validate(model, data, key: str):
    """Validate one slice (`key` names it in errors) with a pydantic model or type."""
    from saedynamics.config import format_errors

    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"invalid settings:\n{format_errors(e, prefix=key)}") from None


def _provenance(settings: dict) -> dict:
    from saedynamics.artifacts import provenance

    return provenance(settings)


def _activation_file(args):
    """The activation file of a (step, layer) job, verified once (its checksum) and checked to be
    that step's and layer's, before any compute."""
    from saedynamics.activations import ActivationFile

    acts = ActivationFile(args.activations)
    found = {k: acts.metadata.get(k) for k in ("step", "layer")}
    if found != {"step": args.step, "layer": args.layer}:
        raise DataError(
            f"{acts.path}: holds the activations of step {found['step']}, layer {found['layer']} "
            f"(its metadata), not of step {args.step}, layer {args.layer} as this job was asked; "
            "rerun the activations rule"
        )
    return acts


def _check_d_in(saes: dict, d_model: int, what: str) -> None:
    """Every SAE (path -> SAE) must take inputs of `what`'s width d_model."""
    wrong = {str(path): sae.d_in for path, sae in saes.items() if sae.d_in != d_model}
    if wrong:
        raise DataError(
            f"{what} has d_model {d_model}, but the SAEs in "
            + ", ".join(f"{path} have d_in {d}" for path, d in wrong.items())
            + " (cfg.json); they were trained on other activations: rerun the train rule"
        )


def _seed_dirs(saes_dir: Path) -> list[Path]:
    dirs = sorted(Path(saes_dir).glob("seed*/"), key=lambda p: int(p.name.removeprefix("seed")))
    if not dirs:
        raise SaedynamicsError(f"{saes_dir}: no seed*/ SAE directories; run the train rule")
    return dirs


def _identity(args, settings: dict, name: str, sae) -> dict:
    return {
        "study": settings["study"],
        "step": args.step,
        "layer": args.layer,
        "architecture": name,
        "architecture_type": sae.architecture,
        "architecture_title": sae.title or sae.architecture,
        "d_model": sae.d_in,
        "n_latents": sae.d_sae,
    }


# ---- commands -----------------------------------------------------------------------------------------


def cmd_check_config(args) -> None:
    from saedynamics.budget import format_budget, study_budget
    from saedynamics.config import load_config

    cfg = load_config(args.path)
    print(
        f"{args.path}: valid; study {cfg.study!r}, {len(cfg.model.steps)} steps x "
        f"{len(cfg.activations.layers)} layers x {len(cfg.architectures)} architectures x "
        f"{len(cfg.training.seeds)} seeds, training.source {cfg.training.source}"
    )
    print(format_budget(study_budget(cfg)))


def cmd_tokens(args) -> None:
    from saedynamics.config import CorpusConfig, ModelConfig, TokensConfig
    from saedynamics.corpus import build_token_sample

    s = _settings(args, "tokens")
    build_token_sample(
        _validate(CorpusConfig, s["corpus"], "corpus"),
        _validate(TokensConfig, s["tokens"], "tokens"),
        _validate(ModelConfig, s["model"], "model"),
        Path(args.out_tokens),
        Path(args.out_tokenizer),
        provenance=_provenance(s),
        work_dir=Path(args.work) if args.work else None,
    )


def cmd_checkpoint(args) -> None:
    from saedynamics.checkpoints import download_checkpoint
    from saedynamics.config import HubModelConfig

    s = _settings(args, "checkpoint")
    model = _validate(HubModelConfig, s["model"], "model")
    earlier = [Path(p) / "manifest.json" if Path(p).is_dir() else Path(p) for p in args.earlier]
    download_checkpoint(model, args.step, Path(args.out), earlier, provenance=_provenance(s))


def cmd_micro_lm(args) -> None:
    from saedynamics.config import MicroModelConfig
    from saedynamics.micro_lm import train_micro_suite

    s = _settings(args, "micro_lm")
    model = _validate(MicroModelConfig, s["model"], "model")
    train_micro_suite(
        model,
        Path(args.tokens),
        Path(args.tokenizer),
        Path(args.out_root),
        Path(args.curve),
        provenance=_provenance(s),
    )


def cmd_activations(args) -> None:
    from saedynamics.caching import cache_activations
    from saedynamics.config import ActivationsConfig, ModelConfig

    s = _settings(args, "activations")
    cfg = _validate(ActivationsConfig, s["activations"], "activations")
    model = _validate(ModelConfig, s["model"], "model")
    cache_activations(
        cfg,
        Path(args.checkpoint),
        Path(args.tokens),
        Path(args.out),
        provenance=_provenance(s),
        model_cfg=model,
        splits=tuple(s.get("splits", ("train", "eval"))),
    )


def cmd_train(args) -> None:
    """Every SAE of one (step, layer)'s set (all architectures, or `--architecture`) x seeds,
    from one read of the activation file."""
    from saedynamics.config import TrainingConfig
    from saedynamics.saes import REGISTRY
    from saedynamics.sources import FileSource
    from saedynamics.training import train_saes

    s = _settings(args, "train")
    if args.architecture is not None:  # the set of one: the settings stage_settings gives for it
        have = s.get("architectures") or {}
        if args.architecture not in have:
            raise ConfigError(
                f"--architecture {args.architecture!r} is not in the architectures of "
                f"{args.config or '--settings'}; it has: {', '.join(have) or 'none'}"
            )
        s = {**s, "architectures": {args.architecture: have[args.architecture]}}
    training = _validate(TrainingConfig, s["training"], "training")
    architectures = {}
    for name, raw in s["architectures"].items():
        kind = raw.get("architecture")
        if kind not in REGISTRY:
            raise ConfigError(
                f"architectures.{name}.architecture: {kind!r} is not registered; allowed: "
                f"{', '.join(sorted(REGISTRY))}"
            )
        architectures[name] = _validate(REGISTRY[kind].Config, raw, f"architectures.{name}")
    identity = {"study": s["study"], "step": args.step, "layer": args.layer}
    if training.source == "stream":
        source = _stream_source(args, s, training)
    elif args.activations:
        source = FileSource(_activation_file(args))
    else:
        raise ConfigError("training.source is 'cache': give --activations (train.parquet)")
    train_saes(
        training,
        architectures,
        source,
        Path(args.out),
        identity,
        _provenance(s),
        resume_dir=Path(args.resume_dir) if args.resume_dir else None,
    )


def _stream_source(args, s: dict, training):
    """training.source stream: the checkpoint run over the token sample, checked against the
    layer's eval cache (whose norm statistics give the input scale)."""
    from saedynamics.config import ActivationsConfig, ModelConfig
    from saedynamics.resources import resolve_device
    from saedynamics.streaming import StreamSource

    missing = [f"--{n}" for n in ("checkpoint", "tokens", "eval") if not getattr(args, n)]
    if missing:
        raise ConfigError(f"training.source is 'stream': give {', '.join(missing)}")
    cfg = _validate(ActivationsConfig, s["activations"], "activations")
    model = _validate(ModelConfig, s["model"], "model")
    eval_args = argparse.Namespace(activations=args.eval, step=args.step, layer=args.layer)
    return StreamSource(
        Path(args.checkpoint),
        Path(args.tokens),
        args.layer,
        _activation_file(eval_args),
        cfg,
        resolve_device(training.device),
        cache_dir=getattr(model, "cache_dir", None),
    )


def cmd_measure(args) -> None:
    """reconstruction.json, consistency.json and superposition.json of each architecture of one
    (step, layer) given, all seeds; the eval activations read (and verified) once."""
    import torch

    from saedynamics.config import MetricsConfig
    from saedynamics.resources import resolve_device
    from saedynamics.saes import load

    s = _settings(args, "measure")
    metrics = _validate(MetricsConfig, s["metrics"], "metrics")
    device = resolve_device(metrics.device)
    acts = _activation_file(args)
    by_name = {}
    for name in args.architectures:  # every SAE checked before any is measured
        by_name[name] = {d: load(d) for d in _seed_dirs(Path(args.saes) / name)}
        _check_d_in(by_name[name], acts.d_model, str(acts.path))
    x_eval = torch.tensor(acts.read()["act"], device=device)  # float16: half the memory

    def eval_batches():
        return (x.float() for x in x_eval.split(metrics.batch_size))

    for name, by_dir in by_name.items():
        saes = [sae.to(device) for sae in by_dir.values()]
        identity = _identity(args, s, name, saes[0])
        _measure_architecture(saes, eval_batches, metrics, Path(args.out) / name, identity, s)


def _measure_architecture(saes, eval_batches, metrics, out: Path, common: dict, s: dict) -> None:
    import numpy as np

    from saedynamics.artifacts import write_json
    from saedynamics.metrics.consistency import compare, null_baseline, summarise
    from saedynamics.metrics.reconstruction import evaluate
    from saedynamics.metrics.superposition import effective_features

    provenance = _provenance(s)
    reconstruction, superposition = [], []
    for sae in saes:
        seed = sae.provenance["seed"]
        reconstruction.append({"seed": seed, **evaluate(sae, eval_batches())})
        codes = (sae.encode(x) for x in eval_batches())
        superposition.append({"seed": seed, **effective_features(codes, sae.d_in)})
        log.info(
            "%s seed %s: FVU %.4f, L0 %.2f, dead %.3f, effective features %.1f",
            common["architecture"],
            seed,
            reconstruction[-1]["fvu"],
            reconstruction[-1]["l0"],
            reconstruction[-1]["dead_fraction"],
            superposition[-1]["effective_features"],
        )

    saes = [sae.cpu() for sae in saes]
    # per latent: with how many other seeds it is shared (latent stability against density)
    shared_with = {sae.provenance["seed"]: np.zeros(sae.d_sae, dtype=np.int64) for sae in saes}
    pairs = []
    for i, a in enumerate(saes):
        for b in saes[i + 1 :]:
            pair = compare(a, b, metrics.shared_threshold, latents=True)
            shared_with[a.provenance["seed"]] += pair.pop("shared_a")
            shared_with[b.provenance["seed"]] += pair.pop("shared_b")
            pairs.append({"seed_a": a.provenance["seed"], "seed_b": b.provenance["seed"], **pair})
    null = null_baseline(
        saes[0].d_sae, saes[0].d_in, metrics.shared_threshold, metrics.null_draws, metrics.null_seed
    )
    pw = summarise([p["mcc"] for p in pairs])
    shared = summarise([p["shared_fraction"] for p in pairs])
    log.info(
        "%s: PW-MCC %.4f (null %.4f); shared fraction %.4f (null %.4f)",
        common["architecture"],
        pw["mean"],
        null["pw_mcc"],
        shared["mean"],
        null["shared_fraction"],
    )
    write_json(out / "reconstruction.json", {**common, "seeds": reconstruction}, provenance)
    write_json(out / "superposition.json", {**common, "seeds": superposition}, provenance)
    write_json(
        out / "consistency.json",
        {
            **common,
            "pw_mcc": pw,
            "shared_fraction": shared,
            "pairs": pairs,
            "null": null,
            "shared_threshold": metrics.shared_threshold,
            "latents": [
                {"seed": seed, "shared_with": counts.tolist()}
                for seed, counts in shared_with.items()
            ],
        },
        provenance,
    )


def cmd_splice(args) -> None:
    """CE-loss recovered and KL score of every SAE of one (step, layer), spliced into its LM."""
    import torch

    from saedynamics.artifacts import write_json
    from saedynamics.checkpoints import load_model
    from saedynamics.config import ActivationsConfig, MetricsConfig
    from saedynamics.corpus import read_token_sample
    from saedynamics.hooks import block_modules
    from saedynamics.metrics.reconstruction import spliced_scores
    from saedynamics.resources import resolve_device
    from saedynamics.saes import load

    s = _settings(args, "splice")
    metrics = _validate(MetricsConfig, s["metrics"], "metrics")
    activations = _validate(ActivationsConfig, s["activations"], "activations")
    device = resolve_device(metrics.device)
    # the SAEs and tokens first: they are cheap to load, and a bad one fails before the LM loads
    by_dir = {d: load(d) for arch_dir in map(Path, args.saes) for d in _seed_dirs(arch_dir)}
    _, windows = read_token_sample(Path(args.tokens), "eval")
    model = load_model(args.checkpoint)  # verified against its manifest first
    _check_d_in(by_dir, model.config.hidden_size, f"{args.checkpoint} (config.json)")
    if args.layer >= len(block_modules(model)):
        raise DataError(
            f"{args.checkpoint}: the model has {len(block_modules(model))} layers; "
            f"layer {args.layer} does not exist"
        )
    model = model.to(device)
    saes, identity = {}, {}
    for seed_dir, sae in by_dir.items():
        key = (seed_dir.parent.name, sae.provenance["seed"])
        saes[key] = sae.to(device)
        identity[key] = {
            "architecture": seed_dir.parent.name,
            "architecture_type": sae.architecture,
            "architecture_title": sae.title or sae.architecture,
            "seed": sae.provenance["seed"],
        }
    first = 1 if activations.drop_first_position and metrics.splice_positions == "trained" else 0
    block = block_modules(model)[args.layer]
    out = spliced_scores(
        model,
        block,
        torch.from_numpy(windows.astype("int64")),
        saes,
        first,
        metrics.splice_batch_sequences,
    )
    for key, scores in out["saes"].items():
        log.info(
            "%s seed %s: CE recovered %.3f, KL score %.3f",
            *key,
            scores["ce_loss_score"],
            scores["kl_score"],
        )
    if (reason := next(iter(out["saes"].values()))["ce_loss_score_reason"]) is not None:
        log.warning("CE recovered and KL score are undefined (NaN): %s", reason)
    write_json(
        args.out,
        {
            "study": s["study"],
            "step": args.step,
            "layer": args.layer,
            "first_position": first,
            **{k: out[k] for k in ("ce_orig", "ce_zero", "kl_zero", "n_tokens")},
            "saes": [identity[key] | scores for key, scores in out["saes"].items()],
        },
        _provenance(s),
    )


def cmd_drift(args) -> None:
    """Decoder drift across checkpoints of every (layer, architecture, seed), and which latents
    are kept, lost and born between consecutive checkpoints. The --reconstruction files (each
    (step, layer, architecture)'s reconstruction.json) give the latents alive on the eval tokens
    (latent_density > 0); without them every latent counts as alive."""
    import numpy as np

    from saedynamics.artifacts import read_json, write_json
    from saedynamics.config import MetricsConfig
    from saedynamics.metrics.consistency import decoder_drift
    from saedynamics.saes import load

    s = _settings(args, "drift")
    metrics = _validate(MetricsConfig, s["metrics"], "metrics")
    decoders: dict[tuple[int, str], dict[int, dict]] = {}  # (layer, name) -> step -> seed -> W_dec
    kinds: dict[tuple[int, str], tuple[str, str]] = {}
    alive: dict[tuple[int, str], dict[int, dict]] = {}  # (layer, name) -> step -> seed -> alive
    for path in map(Path, args.reconstruction):
        doc = read_json(path)
        by_seed = alive.setdefault((doc["layer"], doc["architecture"]), {})
        by_seed[doc["step"]] = {
            seed["seed"]: np.asarray(seed["latent_density"]) > 0 for seed in doc["seeds"]
        }
    for seed_dir in sorted({Path(p).parent for p in args.saes}):
        sae = load(seed_dir)
        ours = sae.provenance
        key = (ours["layer"], ours["architecture_name"])
        decoders.setdefault(key, {}).setdefault(ours["step"], {})[ours["seed"]] = sae.W_dec.detach()
        kinds[key] = (sae.architecture, sae.title or sae.architecture)
    rows = []
    for (layer, name), by_step in sorted(decoders.items()):
        kind, title = kinds[(layer, name)]
        for row in decoder_drift(by_step, metrics.shared_threshold, alive.get((layer, name))):
            rows.append(
                {
                    "layer": layer,
                    "architecture": name,
                    "architecture_type": kind,
                    "architecture_title": title,
                }
                | row
            )
    write_json(args.out, {"study": s["study"], "rows": rows}, _provenance(s))


def cmd_tables(args) -> None:
    from saedynamics.tables import collect

    s = _settings(args, "tables")
    counts = collect([Path(p) for p in args.inputs], Path(args.out), provenance=_provenance(s))
    log.info("tables: %s", ", ".join(f"{k} {v} rows" for k, v in counts.items()))


def cmd_validation(args) -> None:
    """The metrics against known ground truth on toy models: JSON summaries (the figures rule
    draws them)."""
    import tempfile

    from saedynamics.artifacts import write_json
    from saedynamics.config import ValidationConfig
    from saedynamics.toy import organism_validation, superposition_validation

    s = _settings(args, "validation")
    cfg = _validate(ValidationConfig, s["validation"], "validation")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    superposition = superposition_validation(cfg)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".organism.") as work:
        organism = organism_validation(cfg, Path(work))
    provenance = _provenance(s)
    write_json(out / "superposition.json", superposition, provenance)
    write_json(out / "organism.json", organism, provenance)


def cmd_figures(args) -> None:
    from saedynamics.config import FiguresConfig
    from saedynamics.figures import render_all, render_validation

    s = _settings(args, "figures")
    cfg, provenance = _validate(FiguresConfig, s["figures"], "figures"), _provenance(s)
    written = render_all(Path(args.tables), Path(args.out), cfg, provenance=provenance)
    if args.validation:
        written += render_validation(Path(args.validation), Path(args.out), cfg, provenance)
    log.info("figures: %d files in %s", len(written), args.out)


# ---- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saedynamics", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, func, help):
        p = sub.add_parser(name, help=help)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument(
            "--settings", help="the stage's config slice as JSON (what the rules pass)"
        )
        src.add_argument("--config", help="a whole study config file (YAML)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("check-config", help="validate a study config and summarise it")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config, threads=None)

    p = command("tokens", cmd_tokens, "draw the fixed token sample and its tokenizer")
    p.add_argument("--out-tokens", required=True, help="tokens/ (the sample's shards inside)")
    p.add_argument("--out-tokenizer", required=True)
    p.add_argument(
        "--work",
        help="where the sample is built and a killed job resumes (outside the outputs); "
        "default: a sibling of --out-tokens",
    )

    p = command("checkpoint", cmd_checkpoint, "download one Hub checkpoint (with manifest)")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--earlier", nargs="*", default=[], help="earlier checkpoint dirs (for duplicates)"
    )

    p = command("micro-lm", cmd_micro_lm, "train the micro suite and save its checkpoints")
    p.add_argument("--tokens", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out-root", required=True)
    p.add_argument("--curve", required=True)

    p = command("activations", cmd_activations, "cache one checkpoint's activations to Parquet")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True, help="activations/step<N>/ (layer<L>/ written inside)")

    p = command("train", cmd_train, "train a set of SAEs of one (step, layer) from one read")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument(
        "--architecture",
        help="train this architecture alone (default: every one of the config or settings)",
    )
    p.add_argument("--activations", help="training.source cache: train.parquet")
    p.add_argument("--checkpoint", help="training.source stream: checkpoints/step<N>/")
    p.add_argument("--tokens", help="training.source stream: the token sample, tokens/")
    p.add_argument("--eval", help="training.source stream: the layer's eval.parquet (input scale)")
    p.add_argument(
        "--out", required=True, help="saes/step<N>/layer<L>/ (<architecture>/seed<s>/ inside)"
    )
    p.add_argument(
        "--resume-dir",
        help="resume/step<N>/layer<L>/<set>/: checkpoints every training.checkpoint_tokens and a "
        "restart resumes from the last one (outside the outputs); without it, neither",
    )

    p = command(
        "measure",
        cmd_measure,
        "reconstruction, consistency and superposition of SAEs of one (step, layer)",
    )
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument(
        "--architectures", nargs="+", required=True, help="names in the config's architectures"
    )
    p.add_argument("--saes", required=True, help="saes/step<N>/layer<L>/ (<architecture>/ inside)")
    p.add_argument("--activations", required=True, help="eval.parquet")
    p.add_argument(
        "--out", required=True, help="metrics/step<N>/layer<L>/ (<architecture>/ inside)"
    )

    p = command(
        "splice", cmd_splice, "CE-loss recovered and KL score of the SAEs of one (step, layer)"
    )
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument(
        "--saes", nargs="+", required=True, help="saes/step<N>/layer<L>/<architecture>/ dirs"
    )
    p.add_argument("--out", required=True)

    p = command("drift", cmd_drift, "decoder drift across checkpoints")
    p.add_argument("--saes", nargs="+", required=True, help="every seed's cfg.json")
    p.add_argument(
        "--reconstruction", nargs="*", default=[], help="reconstruction.json: the alive latents"
    )
    p.add_argument("--out", required=True)

    p = command("tables", cmd_tables, "collect per-run results into tidy Parquet tables")
    p.add_argument("--out", required=True)
    p.add_argument("--inputs", nargs="+", required=True)

    p = command("validation", cmd_validation, "the metrics against ground truth on toy models")
    p.add_argument("--out", required=True, help="validation/ (JSON summaries and figures)")

    p = command("figures", cmd_figures, "render the figures from the tables")
    p.add_argument("--tables", required=True)
    p.add_argument("--validation", help="validation/ of the study: its figures too")
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (
        not sys.stderr.isatty()
    ):  # a rule's log file: keep our own progress, not every library's bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
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
