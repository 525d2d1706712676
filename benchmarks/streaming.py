"""Stream vs cache on the micro suite: a grouped train job with its activations read from the cached
file, against the same job computing them from the checkpoint (training.source stream).

    python benchmarks/streaming.py                # the demo's step 600, layer 2 (built if missing)
    python benchmarks/streaming.py --tokens 145408  # one pass over the demo's sample

Both jobs are real `python -m saedynamics train` commands on the same token sample, with the demo's
14 architectures x 3 seeds and training settings. adaptivek needs the LM's next-token entropy and
gsae its loss gradient, so in stream mode every buffer costs the whole forward pass and a backward
pass above layer 2. The table gives each job's wall time, its SAE-tokens/s, and the share of its
training time spent producing batches (the trainer's own log: reading and gathering in cache mode,
the LM's forward and backward passes in stream mode), and the same for a set without the two
architectures that need extra columns (the forward pass then stops after layer 2). The study's FLOP
accounting (the LM against the SAE set at config.yaml's scale) is printed by
`python -m saedynamics check-config config.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from saedynamics.config import load_config  # noqa: E402

STEP, LAYER = 600, 2
R = REPO / "results/demo"


def ensure_artifacts() -> None:
    layer = R / f"activations/step{STEP}/layer{LAYER}"
    targets = [layer / "train.parquet", layer / "eval.parquet"]
    if all(t.exists() for t in targets):
        return
    print("building the demo's step-600 artifacts with Snakemake ...", flush=True)
    command = [sys.executable, "-m", "snakemake", "--cores", "all", *map(str, targets)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)


def train_job(settings: dict, inputs: list[str], out: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "saedynamics", "train", "--settings", json.dumps(settings)]
    command += ["--threads", str(threads), "--step", str(STEP), "--layer", str(LAYER)]
    command += [*inputs, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    job = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if job.returncode != 0:
        raise SystemExit(job.stderr[-3000:])
    found = re.search(
        r"(\d+) SAEs x (\d+) tokens in ([\d.]+) s.*reading the batches took ([\d.]+) s", job.stderr
    )
    saes, tokens, training, reading = int(found[1]), int(found[2]), float(found[3]), float(found[4])
    return {"wall": wall, "sae_tokens": saes * tokens, "training": training, "reading": reading}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="tokens per SAE (default: the demo's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (the demo's: 1)")
    args = p.parse_args()
    ensure_artifacts()
    cfg = load_config(REPO / "workflow/configs/demo.yaml")
    layer = R / f"activations/step{STEP}/layer{LAYER}"
    cached = ["--activations", str(layer / "train.parquet")]
    streamed = ["--checkpoint", str(R / f"checkpoints/step{STEP}"), "--tokens", str(R / "tokens")]
    streamed += ["--eval", str(layer / "eval.parquet")]
    every = dict(cfg.architectures)
    plain = {n: a for n, a in every.items() if n not in ("adaptivek", "gsae")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, architectures in (("all 14", every), ("12 without extra columns", plain)):
            for source, inputs in (("cache", cached), ("stream", streamed)):
                with_arch = cfg.model_copy(update={"architectures": architectures})
                settings = with_arch.stage_settings("train")
                settings["training"] |= {"source": source, "checkpoint_tokens": None}
                if args.tokens:
                    settings["training"]["train_tokens"] = args.tokens
                if source == "stream":
                    settings["activations"] = with_arch.stage_settings("activations")["activations"]
                    settings["model"] = cfg.model.model_dump(mode="json")
                out = Path(tmp) / f"{source}-{len(architectures)}"
                rows.append((label, source, train_job(settings, inputs, out, args.threads)))
    tokens = args.tokens or cfg.training.train_tokens
    print(
        f"micro suite step {STEP}, layer {LAYER}: d {cfg.model.d_model}, {cfg.training.n_latents} "
        f"latents, batch {cfg.training.batch_size}, {tokens:,} tokens per SAE, "
        f"{args.threads} thread(s) per job"
    )
    print(
        f"  {'set':26s} {'source':7s} {'wall s':>7s} {'SAE-tokens/s':>13s} {'batches: share':>15s}"
    )
    for label, source, r in rows:
        print(
            f"  {label:26s} {source:7s} {r['wall']:7.1f} {r['sae_tokens'] / r['wall']:13,.0f} "
            f"{100 * r['reading'] / r['training']:14.1f}%"
        )


if __name__ == "__main__":
    main()
