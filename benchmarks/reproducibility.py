"""How far apart two runs of one SAE job land, and so the tolerance of non-deterministic GPU runs.

    python benchmarks/reproducibility.py                    # CPU: repeat, and the rounding proxy
    python benchmarks/reproducibility.py --device cuda      # GPU: repeats with the switch off / on

Every row trains the same job twice (same config, seeds, data order) and prints how far the two
results are apart: the largest weight difference, and the differences of what the tables report
(FVU and L0 on held-out tokens, PW-MCC between the job's two seeds).

- `repeat`: the job run twice as is (`training.deterministic: false`, the default). On a CPU the
  two are bitwise equal (all zeros); on a GPU this row is the run-to-run difference of atomics and
  cuBLAS's workspace choice, i.e. the tolerance to expect with the switch off.
- `repeat, deterministic: true` (GPU only): must be all zeros.
- `ulp noise every step` (any device): the second run moves every weight one float32 ulp up or
  down at random after each optimiser step. Reduction-order differences are rounding differences
  of this size at every step, so this shows, on any machine, where training takes them by the end.

Data: trained-like activations from a known dictionary (`train_throughput.trained_like_activations`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs without installing
from train_throughput import trained_like_activations  # noqa: E402

from saedynamics.config import TrainingConfig  # noqa: E402
from saedynamics.metrics.consistency import mcc  # noqa: E402
from saedynamics.metrics.reconstruction import batch_fvu  # noqa: E402
from saedynamics.saes import REGISTRY, load  # noqa: E402
from saedynamics.sources import TensorSource  # noqa: E402
from saedynamics.training import train_saes  # noqa: E402

ARCHITECTURES = {
    "topk": {"k": 16, "lr": 1e-3},
    "relu": {"l1_coefficient": 2.0, "lr": 1e-3},
}


def rounding_noise(seed: int = 0):
    """observe hook: after every optimiser step, each weight one float32 ulp up or down at random.

    Reduction-order differences (GPU atomics, another cuBLAS kernel) perturb every step's update
    by rounding errors of this size; this injects them on any device."""
    gen = torch.Generator().manual_seed(seed)

    def nudge(step: int, saes: dict) -> None:
        for sae in (sae for by_seed in saes.values() for sae in by_seed.values()):
            for p in sae.parameters():
                up = torch.rand(p.shape, generator=gen) < 0.5
                toward = torch.where(up, float("inf"), float("-inf")).to(p.device, p.dtype)
                p.copy_(torch.nextafter(p, toward))

    return nudge


def train(args, data, out: Path, name: str, deterministic: bool, observe=None) -> dict:
    training = TrainingConfig(
        n_latents=args.latents,
        seeds=[0, 1],
        train_tokens=args.tokens,
        batch_size=args.batch,
        log_every=1,
        device=args.device,
        deterministic=deterministic,
        checkpoint_tokens=None,
    )
    arch = REGISTRY[name].Config(architecture=name, **ARCHITECTURES[name])
    ident = {"study": "bench", "step": 0, "layer": 0}
    train_saes(training, {name: arch}, data, out, ident, {}, observe=observe)
    return {seed: load(out / name / f"seed{seed}") for seed in (0, 1)}


def summary(saes: dict, held_out: torch.Tensor) -> dict:
    out = {"pw_mcc": mcc(saes[0].W_dec.detach(), saes[1].W_dec.detach())}
    with torch.no_grad():
        codes = saes[0].encode(held_out)
        out["fvu"] = batch_fvu(held_out, saes[0].decode(codes)).item()
        out["l0"] = (codes != 0).sum(-1).float().mean().item()
    return out


def compare(a: dict, b: dict, held_out: torch.Tensor) -> dict:
    weights = max(
        (wa - b[s].weights()[k]).abs().max().item() for s in a for k, wa in a[s].weights().items()
    )
    sa, sb = summary(a, held_out), summary(b, held_out)
    return {"max |dW|": weights, **{f"d {k}": abs(sa[k] - sb[k]) for k in sa}, "fvu": sa["fvu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=204_800)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()

    tokens = trained_like_activations(args.tokens + 8192, args.d, 4 * args.d, 16, seed=0)
    held_out = tokens[args.tokens :]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = TensorSource({"act": tokens[: args.tokens]})
        runs = iter(range(1000))
        for name in ARCHITECTURES:

            def run(deterministic: bool, observe=None, name=name) -> dict:
                out = Path(tmp) / f"run{next(runs)}"
                return train(args, data, out, name, deterministic, observe)

            reference = run(False)
            rows.append((name, "repeat", compare(reference, run(False), held_out)))
            if args.device != "cpu":
                det = run(True)
                rows.append(
                    (name, "repeat, deterministic: true", compare(det, run(True), held_out))
                )
            noisy = run(False, rounding_noise())
            rows.append((name, "ulp noise every step", compare(reference, noisy, held_out)))

    print(
        f"d {args.d}, {args.latents} latents, {args.tokens:,} tokens in batches of {args.batch} "
        f"({args.tokens // args.batch} steps), 2 seeds, device {args.device}, torch {torch.__version__}"
    )
    print(
        f"\n{'architecture':13}{'pair':30}{'max |dW|':>10}{'d FVU':>10}{'d L0':>10}{'d PW-MCC':>10}  FVU"
    )
    for name, pair, r in rows:
        print(
            f"{name:13}{pair:30}{r['max |dW|']:10.1e}{r['d fvu']:10.1e}{r['d l0']:10.1e}"
            f"{r['d pw_mcc']:10.1e}  {r['fvu']:.4f}"
        )


if __name__ == "__main__":
    main()
