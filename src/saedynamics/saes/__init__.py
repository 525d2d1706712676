"""Sparse autoencoder architectures, one module each, behind the interface of `base`.

Importing this package registers every architecture; `REGISTRY` maps names to classes.
"""

from saedynamics.saes import relu, topk  # noqa: F401  (registration side effect)
from saedynamics.saes.base import REGISTRY, SAE, ArchitectureConfig, TrainStep, load, register

__all__ = ["REGISTRY", "SAE", "ArchitectureConfig", "TrainStep", "load", "register"]
