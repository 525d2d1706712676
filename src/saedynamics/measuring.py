"""The measure stage: reconstruction.json, consistency.json and superposition.json of each
architecture of one (step, layer), all seeds, from the layer's eval activations (read and
verified once). The metrics themselves are in `saedynamics.metrics`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from saedynamics.artifacts import write_json
from saedynamics.inputs import check_d_in, checked_activation_file, seed_dirs
from saedynamics.metrics.consistency import compare, null_baseline, summarise
from saedynamics.metrics.reconstruction import evaluate
from saedynamics.metrics.superposition import effective_features
from saedynamics.resources import resolve_device
from saedynamics.saes import load

log = logging.getLogger("saedynamics")


def measure(
    metrics,
    activations: Path,
    saes: Path,
    architectures: list[str],
    out: Path,
    *,
    study: str,
    step: int,
    layer: int,
    provenance: dict,
) -> None:
    """Measure the SAEs saes/<architecture>/seed<s>/ of each of `architectures` (a validated
    MetricsConfig `metrics`) on the eval activations; write out/<architecture>/*.json."""
    device = resolve_device(metrics.device)
    acts = checked_activation_file(activations, step, layer)
    by_name = {}
    for name in architectures:  # every SAE checked before any is measured
        by_name[name] = {d: load(d) for d in seed_dirs(Path(saes) / name)}
        check_d_in(by_name[name], acts.d_model, str(acts.path))
    x_eval = torch.tensor(acts.read()["act"], device=device)  # float16: half the memory

    def eval_batches():
        return (x.float() for x in x_eval.split(metrics.batch_size))

    for name, by_dir in by_name.items():
        models = [sae.to(device) for sae in by_dir.values()]
        identity = {
            "study": study,
            "step": step,
            "layer": layer,
            "architecture": name,
            "architecture_type": models[0].architecture,
            "architecture_title": models[0].title or models[0].architecture,
            "d_model": models[0].d_in,
            "n_latents": models[0].d_sae,
        }
        measure_architecture(models, eval_batches, metrics, Path(out) / name, identity, provenance)


def measure_architecture(
    saes, eval_batches, metrics, out: Path, common: dict, provenance: dict
) -> None:
    """The three JSON files of one architecture's seeds `saes` into `out`; `eval_batches()`
    gives a fresh iterator of float eval batches, `common` the identity every file starts with."""
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
