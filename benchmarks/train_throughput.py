"""TopK SAE training throughput: saedynamics vs SAELens on identical data and hyperparameters.

    python benchmarks/train_throughput.py                       # CPU: d 512, 4096 latents, k 32
    python benchmarks/train_throughput.py --latents 16384 --device cuda --tokens 20000000

Data: trained-like activations from a known dictionary (`--true-latents` unit directions, each
token a sum of `--true-k` of them with Zipf-distributed frequencies and |N(0,1)| magnitudes, plus
Gaussian noise), the same arrays for both libraries. Hyperparameters: Adam at the same lr and
betas, constant lr, gradient clipping at 1, AuxK at 1/32, b_dec starting at 0, tied init with
decoder rows of norm 1 (Gao et al., ours; SAELens' default is 0.1, `--saelens-decoder-init-norm`),
no input normalisation, batch 4096.

saedynamics runs its real trainer (`training.train_saes`: Parquet reader, every seed on the same
batch, export); SAELens runs its `SAETrainer` on the same batches already in memory (the advantage
is SAELens'). Throughput is tokens per second per SAE; FVU is measured on held-out tokens by one
formula for both (`metrics.reconstruction.batch_fvu`). Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs without installing
from saedynamics.config import TrainingConfig
from saedynamics.metrics.reconstruction import batch_fvu
from saedynamics.saes import REGISTRY, load, sparse
from saedynamics.toy import write_activations
from saedynamics.training import train_saes


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
    train_saes(training, "topk", arch, data, out, {"study": "bench", "step": 0, "layer": 0}, {})
    seconds = time.perf_counter() - started
    return seconds / args.seeds, load(out / "seed0")


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
    p.add_argument("--with-dense", action="store_true", help="also time our dense path")
    p.add_argument(
        "--b-dec-init",
        default="zero",
        choices=["zero", "geometric_median"],
        help="ours; zero as SAELens (our TopK default: the geometric median)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

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
