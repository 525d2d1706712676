"""Collect the per-run JSON (and loss curves, LM statistics) into tidy Parquet tables.

One row per (step, layer, architecture, seed) in reconstruction / superposition, per seed pair in
consistency, per logged optimiser step in training, per LM checkpoint in checkpoints. The figures
are drawn from these tables alone, so they can be rebuilt from cached tables (DVC) without any
upstream artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from saedynamics.activations import read_metadata
from saedynamics.artifacts import MANIFEST, read_json, write_parquet

TABLES = [
    "reconstruction",
    "consistency",
    "superposition",
    "spliced",
    "drift",
    "latent_stability",
    "training",
    "checkpoints",
]
DENSITY_BINS = np.arange(-6.0, 0.01, 0.5)  # log10 firing density of a latent on the eval tokens
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


def spliced_rows(doc: dict) -> list[dict]:
    common = {k: doc[k] for k in ("study", "step", "layer", "ce_orig", "ce_zero", "kl_zero")}
    return [common | row for row in doc["saes"]]


def latent_stability_rows(recon: dict, cons: dict) -> list[dict]:
    """Latents binned by log10 firing density: how often they are shared with the other seeds."""
    density = {seed["seed"]: np.asarray(seed["latent_density"]) for seed in recon["seeds"]}
    n_others = len(density) - 1
    rows = []
    for entry in cons["latents"]:
        d = density[entry["seed"]]
        shared = np.asarray(entry["shared_with"])
        alive = d > 0
        which = np.digitize(np.log10(d[alive]), DENSITY_BINS)
        for b in np.unique(which):
            sel = shared[alive][which == b]
            lo = DENSITY_BINS[b - 1] if b > 0 else -np.inf
            hi = DENSITY_BINS[b] if b < len(DENSITY_BINS) else 0.0
            rows.append(
                _identity(recon)
                | {
                    "seed": entry["seed"],
                    "log10_density_lo": float(lo),
                    "log10_density_hi": float(hi),
                    "n_latents": int(len(sel)),
                    "shared_with_all": float((sel == n_others).mean()),
                    "shared_with_any": float((sel > 0).mean()),
                }
            )
    return rows


def collect(inputs: list[Path], out_dir: Path, provenance: dict | None = None) -> dict[str, int]:
    """Write out_dir/<table>.parquet for every table (with `provenance`); return the row counts."""
    rows: dict[str, list[dict]] = {name: [] for name in TABLES}
    per_run: dict[tuple, dict[str, dict]] = {}  # (step, layer, architecture) -> metric -> doc
    for path in map(Path, inputs):
        if path.is_dir() and (path / MANIFEST).exists():  # a checkpoint directory
            path = path / MANIFEST
        if path.name == "reconstruction.json":
            doc = read_json(path)
            rows["reconstruction"] += reconstruction_rows(doc)
            per_run.setdefault((doc["step"], doc["layer"], doc["architecture"]), {})["recon"] = doc
        elif path.name == "consistency.json":
            doc = read_json(path)
            rows["consistency"] += consistency_rows(doc)
            per_run.setdefault((doc["step"], doc["layer"], doc["architecture"]), {})["cons"] = doc
        elif path.name == "spliced.json":
            rows["spliced"] += spliced_rows(read_json(path))
        elif path.name == "drift.json":
            doc = read_json(path)
            rows["drift"] += [{"study": doc["study"]} | row for row in doc["rows"]]
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
        elif path.name == MANIFEST:
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

    for docs in per_run.values():
        if "recon" in docs and "cons" in docs:
            rows["latent_stability"] += latent_stability_rows(docs["recon"], docs["cons"])
    lm = pd.DataFrame(rows.pop("_lm", [])).drop_duplicates("step")
    counts = {}
    for name in TABLES:
        df = pd.DataFrame(rows[name])
        if name == "checkpoints" and len(lm):
            df = df.merge(lm, on="step", how="left")
        sort = [
            c
            for c in (
                "step",
                "layer",
                "architecture",
                "seed",
                "seed_a",
                "seed_b",
                "train_step",
                "log10_density_lo",
            )
            if c in df.columns
        ]
        if sort:
            df = df.sort_values(sort, kind="stable").reset_index(drop=True)
        # what DataFrame.to_parquet(index=False) writes, with provenance in the schema metadata
        table = pa.Table.from_pandas(df, preserve_index=False)
        write_parquet(out_dir / f"{name}.parquet", table, provenance)
        counts[name] = len(df)
    return counts


def load(tables_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(tables_dir) / f"{name}.parquet")
