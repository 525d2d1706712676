"""The drift stage: decoder drift across checkpoints of every (layer, architecture, seed), and
which latents are kept, lost and born between consecutive checkpoints (the metric is
`metrics.consistency.decoder_drift`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saedynamics.artifacts import read_json, write_json
from saedynamics.metrics.consistency import decoder_drift
from saedynamics.saes import load


def drift(
    metrics,
    saes: list[Path],
    reconstruction: list[Path],
    out: Path,
    *,
    study: str,
    provenance: dict,
) -> None:
    """Drift rows of the SAEs whose cfg.json files are `saes` (a validated MetricsConfig
    `metrics`) into the JSON file `out`. The `reconstruction` files (each (step, layer,
    architecture)'s reconstruction.json) give the latents alive on the eval tokens
    (latent_density > 0); without them every latent counts as alive."""
    decoders: dict[tuple[int, str], dict[int, dict]] = {}  # (layer, name) -> step -> seed -> W_dec
    kinds: dict[tuple[int, str], tuple[str, str]] = {}
    alive: dict[tuple[int, str], dict[int, dict]] = {}  # (layer, name) -> step -> seed -> alive
    for path in map(Path, reconstruction):
        doc = read_json(path)
        by_seed = alive.setdefault((doc["layer"], doc["architecture"]), {})
        by_seed[doc["step"]] = {
            seed["seed"]: np.asarray(seed["latent_density"]) > 0 for seed in doc["seeds"]
        }
    for seed_dir in sorted({Path(p).parent for p in saes}):
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
    write_json(out, {"study": study, "rows": rows}, provenance)
