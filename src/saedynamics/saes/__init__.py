"""Sparse autoencoder architectures, one module each, behind the interface of `base`.

Importing this package imports every module in it, which registers its architecture;
`REGISTRY` maps names to classes.
"""

import importlib
import pkgutil

from saedynamics.saes.base import REGISTRY, SAE, ArchitectureConfig, TrainStep, load, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "SAE", "ArchitectureConfig", "TrainStep", "load", "register"]
