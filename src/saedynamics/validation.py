"""The validation stage: the metrics against known ground truth on toy models (`saedynamics.toy`),
as JSON summaries (the figures rule draws them)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from saedynamics.artifacts import write_json
from saedynamics.toy import organism_validation, superposition_validation


def validate_on_toys(cfg, out: Path, provenance: dict) -> None:
    """superposition.json and organism.json into the folder `out` (a validated ValidationConfig
    `cfg`); the organism's SAEs are trained in a temporary folder beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    superposition = superposition_validation(cfg)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".organism.") as work:
        organism = organism_validation(cfg, Path(work))
    write_json(out / "superposition.json", superposition, provenance)
    write_json(out / "organism.json", organism, provenance)
