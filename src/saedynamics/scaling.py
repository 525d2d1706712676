"""Input scaling: the norm statistics of a set of activations and the scale the trainer takes
from them (training.input_scaling). The trainer multiplies its inputs by the scale and folds it into
the weights at export, so a saved SAE works on raw activations (SAELens' normalisation)."""

from __future__ import annotations

import torch

from saedynamics.errors import DataError


class NormStatistics:
    """E|x|, E|x|^2 and E|x - E x|^2 of rows added in any chunks (float64 sums across chunks)."""

    def __init__(self, d_model: int):
        self.n, self.norm, self.sq_norm = 0, 0.0, 0.0
        self.sum = torch.zeros(d_model, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Add rows [n, d] (on any device: their sums come back in one transfer)."""
        x = x.float()
        norms = torch.linalg.vector_norm(x, dim=1).double()
        sums = torch.cat([norms.sum()[None], norms.square().sum()[None], x.sum(0).double()]).cpu()
        if not torch.isfinite(sums).all():
            raise DataError("activations overflow float16 (|x| > 65504) or are not finite")
        self.n += len(x)
        self.norm += sums[0].item()
        self.sq_norm += sums[1].item()
        self.sum += sums[2:]

    def result(self) -> dict:
        mean = self.sum / self.n
        return {
            "n_rows": self.n,
            "mean_norm": self.norm / self.n,  # E|x|
            "mean_squared_norm": self.sq_norm / self.n,  # E|x|^2
            "centred_mean_squared_norm": self.sq_norm / self.n - mean.pow(2).sum().item(),
        }


def norm_statistics(x: torch.Tensor) -> dict:
    stats = NormStatistics(x.shape[1])
    stats.add(x)
    return stats.result()


def input_scale(norm: dict, scheme: str, d_model: int) -> float:
    """The factor the trainer multiplies inputs by (see TrainingConfig.input_scaling)."""
    if scheme == "expected_norm":  # E|x| = sqrt(d)  (SAELens expected_average_only_in)
        return d_model**0.5 / norm["mean_norm"]
    if scheme == "centred":  # E|x - E x|^2 = d: unit variance per dimension on average
        return (d_model / norm["centred_mean_squared_norm"]) ** 0.5
    return 1.0
