"""Collect the per-run JSON (and loss curves, LM statistics) into tidy Parquet tables.

One row per (step, layer, architecture, seed) in reconstruction / superposition, per seed pair in
consistency, per logged optimiser step in training, per LM checkpoint in checkpoints. The figures
are drawn from these tables alone, so they can be rebuilt from cached tables (DVC) without any
upstream artifact.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from saedynamics.activations import read_metadata
from saedynamics.artifacts import atomic_file, read_json

TABLES = ["reconstruction", "consistency", "superposition", "training", "checkpoints"]
KEYS = ["study", "step", "layer", "architecture", "architecture_type", "architecture_title"]


def _identity(doc: dict) -> dict:
    return {k: doc[k] for k in KEYS} | {"d_model": doc["d_model"], "n_latents": doc["n_latents"]}


def reconstruction_rows(doc: dict) -> list[dict]:
    return [
        _identity(doc) | {k: v for k, v in seed.items() if k != "latent_density"}
        for seed in doc["seeds"]
    ]


def superposition_rows(doc: dict) -> list[dict]:
    return [_identity(doc) | seed for seed in doc["seeds"]]


def consistency_rows(doc: dict) -> list[dict]:
    null = {f"null_{k}": doc["null"][k] for k in ("pw_mcc", "max_cosine", "shared_fraction")}
    return [_identity(doc) | pair | null for pair in doc["pairs"]]


def collect(inputs: list[Path], out_dir: Path) -> dict[str, int]:
    """Write out_dir/<table>.parquet for every table; return the row counts."""
    rows: dict[str, list[dict]] = {name: [] for name in TABLES}
    for path in map(Path, inputs):
        if path.is_dir() and (path / "manifest.json").exists():  # a checkpoint directory
            path = path / "manifest.json"
        if path.name == "reconstruction.json":
            rows["reconstruction"] += reconstruction_rows(read_json(path))
        elif path.name == "consistency.json":
            rows["consistency"] += consistency_rows(read_json(path))
        elif path.name == "superposition.json":
            rows["superposition"] += superposition_rows(read_json(path))
        elif path.name == "training.parquet":
            cfg = read_json(path.parent / "cfg.json")["saedynamics"]
            ident = {k: cfg[k] for k in ("study", "step", "layer")} | {
                "architecture": cfg["architecture_name"],
                "architecture_type": cfg["architecture"],
                "seed": cfg["seed"],
            }
            rows["training"] += [ident | r for r in pq.read_table(path).to_pylist()]
        elif path.name == "manifest.json":
            m = read_json(path)
            rows["checkpoints"].append(
                {
                    k: m.get(k)
                    for k in ("step", "revision", "commit", "duplicate_of", "weights_sha256")
                }
            )
        elif path.name == "eval.parquet":
            meta = read_metadata(path)
            rows.setdefault("_lm", []).append(
                {
                    "step": meta["step"],
                    "lm_eval_loss": meta["lm_eval_loss"],
                    "lm_eval_tokens": meta["lm_eval_tokens"],
                }
            )
        else:
            raise ValueError(f"tables: do not know what to do with {path}")

    lm = pd.DataFrame(rows.pop("_lm", [])).drop_duplicates("step")
    counts = {}
    for name in TABLES:
        df = pd.DataFrame(rows[name])
        if name == "checkpoints" and len(lm):
            df = df.merge(lm, on="step", how="left")
        sort = [
            c
            for c in ("step", "layer", "architecture", "seed", "seed_a", "seed_b", "train_step")
            if c in df.columns
        ]
        if sort:
            df = df.sort_values(sort, kind="stable").reset_index(drop=True)
        with atomic_file(out_dir / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        counts[name] = len(df)
    return counts


def load(tables_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(tables_dir) / f"{name}.parquet")
