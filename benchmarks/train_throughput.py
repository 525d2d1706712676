"""SAE training throughput: one job training a set of SAEs from one read against separate jobs,
and TopK training against SAELens on identical data and hyperparameters.

    python benchmarks/train_throughput.py                  # both comparisons, CPU
    python benchmarks/train_throughput.py --only grouped   # grouped vs separate jobs
    python benchmarks/train_throughput.py --only saelens --latents 16384 --device cuda --tokens 20000000

Grouped vs separate (`--only grouped`), at two settings: the demo's (workflow/configs/demo.yaml:
its 14 architectures x 3 seeds, d 64, 512 latents, its training settings) and the study's shape
(d 512, 4096 latents, 4 TopK SAEs: k 32 and 64, 2 seeds each, batch 4096). The same activation
file (trained-like activations, stand-in extra columns for the architectures that need them) is
trained on by real `python -m saedynamics train` jobs: one job for the whole set, as the workflow
runs it, against one job per architecture (`training.split_by_architecture`), run one after the
other. Throughput is SAE-tokens/s over the jobs' wall time, start-up included. The reading share
is the time spent reading (opening and verifying the file, then loading it and gathering every
batch, which the trainer itself times and logs) over the grouped job's training time, at the
benchmark's length; and extrapolated to the study's (config.yaml: 2.1M cached tokens per (step,
layer), 50M training tokens per SAE) from in-process timings of the same source: the one-time
costs scale with the file, the gathers with the steps.

Data: trained-like activations from a known dictionary (`--true-latents` unit directions, each
token a sum of `--true-k` of them with Zipf-distributed frequencies and |N(0,1)| magnitudes, plus
Gaussian noise), the same arrays for both libraries. Hyperparameters: Adam at the same lr and
betas, constant lr, gradient clipping at 1, AuxK at 1/32, b_dec starting at 0, tied init with
decoder rows of norm 1 (Gao et al., ours; SAELens' default is 0.1, `--saelens-decoder-init-norm`),
no input normalisation, batch 4096.

saedynamics runs its real trainer (`training.train_saes` from an activation file, every seed on the
same batch, export); SAELens runs its `SAETrainer` on the same batches already in memory (the advantage
is SAELens'). Throughput is tokens per second per SAE; FVU is measured on held-out tokens by one
formula for both (`metrics.reconstruction.batch_fvu`). Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs without installing
from saedynamics.activations import ActivationFile, ActivationWriter  # noqa: E402
from saedynamics.config import TrainingConfig, load_config  # noqa: E402
from saedynamics.metrics.reconstruction import batch_fvu  # noqa: E402
from saedynamics.saes import REGISTRY, load, sparse  # noqa: E402
from saedynamics.sources import FileSource  # noqa: E402
from saedynamics.training import required_columns, train_saes  # noqa: E402

STUDY_ROWS, STUDY_TOKENS = 2_097_152, 50_000_000  # config.yaml, per (step, layer) and per SAE


def trained_like_activations(n: int, d: int, m: int, k: int, seed: int) -> torch.Tensor:
    """n tokens [n, d] from a known dictionary of m directions, k active per token (Zipf)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(m, d, generator=gen), dim=1)
    frequency = 1.0 / torch.arange(1, m + 1) ** 0.8
    out = torch.empty(n, d)
    for start in range(0, n, 8192):
        b = min(8192, n - start)
        active = torch.multinomial(frequency.expand(b, m), k, generator=gen)
        magnitude = torch.randn(b, k, generator=gen).abs()
        out[start : start + b] = F.embedding_bag(
            active, dictionary, mode="sum", per_sample_weights=magnitude
        )
    out += 0.05 * torch.randn(n, d, generator=gen)
    return out * (d**0.5 / out.norm(dim=1).mean())  # E|x| = sqrt(d), as after input scaling


def write_activations(path: Path, x: torch.Tensor, extras=()) -> None:
    """x as an activation file of step 0, layer 0, with stand-in extra columns."""
    gen = torch.Generator().manual_seed(1)
    columns = {}
    if "lm_entropy" in extras:
        columns["lm_entropy"] = torch.rand(len(x), generator=gen) * 8
    if "lm_grad" in extras:
        columns["lm_grad"] = torch.randn(x.shape, generator=gen) * 1e-3
    writer = ActivationWriter(
        path, x.shape[1], {"step": 0, "layer": 0}, 8192, tuple(sorted(columns))
    )
    idx = np.arange(len(x), dtype=np.int32)
    for start in range(0, len(x), 65536):
        part = slice(start, start + 65536)
        writer.append(
            idx[part], idx[part], idx[part], x[part], **{c: v[part] for c, v in columns.items()}
        )
    writer.close()


def run_ours(args, train: torch.Tensor, workdir: Path, mode: str):
    data = workdir / "train.parquet"
    if not data.exists():
        write_activations(data, train)
    training = TrainingConfig(
        n_latents=args.latents,
        seeds=list(range(args.seeds)),
        train_tokens=len(train),
        batch_size=args.batch,
        init_tokens=args.batch,
        lr_warmup_fraction=0.0,
        lr_decay_fraction=0.0,
        input_scaling="none",
        log_every=10_000,
        device=args.device,
        sparse_path=mode,
    )
    arch = REGISTRY["topk"].Config(
        architecture="topk", k=args.k, lr=args.lr, aux_alpha=1 / 32, b_dec_init=args.b_dec_init
    )
    out = workdir / f"ours-{mode}"
    started = time.perf_counter()
    identity = {"study": "bench", "step": 0, "layer": 0}
    train_saes(training, {"topk": arch}, FileSource(ActivationFile(data)), out, identity, {})
    seconds = time.perf_counter() - started
    return seconds / args.seeds, load(out / "topk" / "seed0")


# ---- grouped vs separate jobs ------------------------------------------------------------------


def train_job(data: Path, out: Path, training: dict, architectures: dict, threads: int) -> dict:
    """One `python -m saedynamics train` job: its wall time and what its log says."""
    settings = {"study": "bench", "training": training, "architectures": architectures}
    command = [sys.executable, "-m", "saedynamics", "train", "--settings", json.dumps(settings)]
    command += ["--threads", str(threads), "--step", "0", "--layer", "0"]
    command += ["--activations", str(data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    job = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if job.returncode != 0:
        raise SystemExit(f"train job failed:\n{job.stderr[-3000:]}")
    found = re.search(
        r"SAEs x (\d+) tokens in ([\d.]+) s.*reading the batches took ([\d.]+) s", job.stderr
    )
    return {
        "wall": seconds,
        "tokens": int(found[1]),
        "training": float(found[2]),
        "reading": float(found[3]),
    }


def reading_costs(data: Path, training: dict, architectures: dict, device) -> dict:
    """Seconds to open and verify the file, to load it, and per batch gathered (in-process)."""
    started = time.perf_counter()
    source = FileSource(ActivationFile(data))
    verify = time.perf_counter() - started
    columns = required_columns(
        {n: REGISTRY[a["architecture"]].Config(**a) for n, a in architectures.items()}
    )
    buffer_rows = training.get(
        "shuffle_tokens", TrainingConfig.model_fields["shuffle_tokens"].default
    )
    batches = source.batches(training["batch_size"], columns, 0, buffer_rows, device)
    started = time.perf_counter()
    next(batches)
    load = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(50):
        next(batches)
    return {"verify": verify, "load": load, "gather": (time.perf_counter() - started) / 50}


def grouped_vs_separate(
    name: str, x: torch.Tensor, training: dict, architectures: dict, args, workdir: Path
) -> None:
    data = workdir / f"{name}.parquet"
    extras = required_columns(
        {n: REGISTRY[a["architecture"]].Config(**a) for n, a in architectures.items()}
    )[1:]
    write_activations(data, x, extras)
    training = {**training, "device": args.device, "checkpoint_tokens": None}
    n_saes = len(architectures) * len(training["seeds"])
    grouped = train_job(data, workdir / f"{name}-grouped", training, architectures, args.threads)
    separate = [
        train_job(data, workdir / f"{name}-{arch}", training, {arch: hyper}, args.threads)
        for arch, hyper in architectures.items()
    ]
    sae_tokens = n_saes * grouped["tokens"]
    costs = reading_costs(data, training, architectures, args.device)
    steps = grouped["tokens"] // training["batch_size"]
    step = grouped["training"] / steps
    one_time = costs["verify"] + costs["load"]
    # the job's own account (the trainer times every batch it is handed), plus opening the file
    share = (costs["verify"] + grouped["reading"]) / (costs["verify"] + grouped["training"])
    study_steps = STUDY_TOKENS // training["batch_size"]
    study_one_time = one_time * STUDY_ROWS / len(x)
    study_share = (study_one_time + study_steps * costs["gather"]) / (study_steps * step)
    separate_wall = sum(j["wall"] for j in separate)
    print(
        f"\n{name}: {len(architectures)} architectures x {len(training['seeds'])} seeds = {n_saes} "
        f"SAEs, d {x.shape[1]}, {training['n_latents']} latents, batch {training['batch_size']}, "
        f"{grouped['tokens']:,} tokens per SAE, {len(x):,} rows in the file"
    )
    print(f"  {'jobs':46s} {'wall s':>8s} {'SAE-tokens/s':>13s} {'x separate':>11s}")
    print(
        f"  {'one job, every SAE from one read':46s} {grouped['wall']:8.1f} "
        f"{sae_tokens / grouped['wall']:13,.0f} {separate_wall / grouped['wall']:11.2f}"
    )
    print(
        f"  {f'{len(separate)} jobs, one per architecture':46s} {separate_wall:8.1f} "
        f"{sae_tokens / separate_wall:13,.0f} {1:11.2f}"
    )
    print(
        f"  reading: open + verify {costs['verify']:.3f} s, load {costs['load']:.3f} s, "
        f"{1e3 * costs['gather']:.2f} ms per batch; a training step of the set {1e3 * step:.0f} ms"
    )
    print(
        f"  reading share of the grouped job's training time: {100 * share:.2f}% here, "
        f"{100 * study_share:.2f}% at the study's length ({STUDY_ROWS:,} rows, {study_steps:,} steps)"
    )


def run_grouped(args) -> None:
    demo = load_config(REPO / "workflow/configs/demo.yaml")
    dump = demo.model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        x = trained_like_activations(114_304, demo.model.d_model, 1024, 8, seed=0)
        grouped_vs_separate(
            "demo settings", x, dump["training"], dump["architectures"], args, Path(tmp)
        )
        training = {
            "n_latents": args.latents,
            "seeds": [0, 1],
            "train_tokens": args.grouped_tokens,
            "batch_size": args.batch,
            "init_tokens": args.batch,
            "input_scaling": "expected_norm",
        }
        architectures = {
            f"topk_k{k}": {"architecture": "topk", "k": k, "lr": args.lr}
            for k in (args.k, 2 * args.k)
        }
        x = trained_like_activations(
            args.grouped_rows, args.d, args.true_latents, args.true_k, seed=0
        )
        grouped_vs_separate("study shape", x, training, architectures, args, Path(tmp))


def run_saelens(args, train: torch.Tensor, sparse_activations: bool):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=train.shape[1],
            d_sae=args.latents,
            k=args.k,
            aux_loss_coefficient=1 / 32,
            decoder_init_norm=args.saelens_decoder_init_norm,
            use_sparse_activations=sparse_activations,
            dtype="float32",
            device=args.device,
        )
    )
    batches = (train[i : i + args.batch].to(args.device) for i in range(0, len(train), args.batch))
    cfg = SAETrainerConfig(
        total_training_samples=len(train) // args.batch * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,  # constant (LanguageModelSAERunnerConfig sets this in post-init)
        device=args.device,
        autocast=args.device == "cuda",
    )
    started = time.perf_counter()
    SAETrainer(cfg, sae, batches).fit()
    return time.perf_counter() - started, sae


def fvu(sae, held_out: torch.Tensor) -> float:
    """FVU over all held-out tokens (their mean in the denominator), by one formula for both."""
    sae = sae.cpu().float().eval()
    with torch.no_grad():
        x_hat = torch.cat([sae.decode(sae.encode(x)) for x in held_out.split(4096)])
    return batch_fvu(held_out, x_hat).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seeds", type=int, default=2, help="seeds saedynamics trains together")
    p.add_argument("--true-latents", type=int, default=8192)
    p.add_argument("--true-k", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--saelens-decoder-init-norm",
        type=float,
        default=1.0,
        help="SAELens' decoder row norm at init (its default 0.1; ours, as Gao et al., 1.0)",
    )
    p.add_argument("--skip-saelens", action="store_true")
    p.add_argument("--only", choices=["grouped", "saelens"], help="run one comparison only")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="grouped: per job")
    p.add_argument("--grouped-tokens", type=int, default=409_600, help="grouped: tokens per SAE")
    p.add_argument("--grouped-rows", type=int, default=262_144, help="grouped: rows in the file")
    p.add_argument("--with-dense", action="store_true", help="also time our dense path")
    p.add_argument(
        "--b-dec-init",
        default="zero",
        choices=["zero", "geometric_median"],
        help="ours; zero as SAELens (our TopK default: the geometric median)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only != "saelens":
        run_grouped(args)
    if args.only == "grouped":
        return

    n = args.tokens // args.batch * args.batch
    data = trained_like_activations(n + 16384, args.d, args.true_latents, args.true_k, seed=0)
    train, held_out = data[:n], data[n:]
    print(
        f"TopK SAE, d {args.d}, {args.latents} latents, k {args.k}, batch {args.batch}, {n:,} "
        f"tokens, device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("auto", "dense") if args.with_dense else ("auto",):
            seconds, sae = run_ours(args, train, Path(tmp), mode)
            rows.append((f"saedynamics ({mode} path, {args.seeds} seeds together)", seconds, sae))
    if not args.skip_saelens:
        import sae_lens

        # its use_sparse_activations option fails on CPU (torch 2.13: aten::view on SparseCPU)
        seconds, sae = run_saelens(args, train, sparse_activations=args.device != "cpu")
        rows.append((f"SAELens {sae_lens.__version__}", seconds, sae))

    reference = rows[-1]  # SAELens, or the last of ours with --skip-saelens
    ref_fvu = fvu(reference[2], held_out)
    print(f"\n{'trainer':58s} {'tokens/s':>9s} {'x ref':>6s} {'FVU':>7s} {'dFVU %':>7s}")
    for label, seconds, sae in rows:
        value = fvu(sae, held_out)
        print(
            f"{label:58s} {n / seconds:9,.0f} {reference[1] / seconds:6.2f} {value:7.4f} "
            f"{100 * (value - ref_fvu) / ref_fvu:+7.2f}"
        )
    print(f"(ratios and FVU differences against: {reference[0]}; tokens/s per SAE)")
    print(f"sparse path: auto below {sparse.DENSITY_LIMIT:.0%} non-zeros (saes/sparse.py)")


if __name__ == "__main__":
    main()
