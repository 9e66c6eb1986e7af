"""The strategies that ship with `lowrank`, registered through the same hooks a third party uses.

Each module listed in ``MODULES`` defines ``STRATEGIES``, the classes it provides; the hooks
below register every one of them under its kind.
"""

from __future__ import annotations

import importlib

import lowrank

from .allocators import Energy, Uniform
from .scalings import ASVD, Identity, Whitening

__all__ = ["Identity", "ASVD", "Whitening", "Uniform", "Energy", "MODULES", "DEFAULTS"]

MODULES = ("scalings", "allocators", "sigmascale", "sensitivity", "zero_sum", "loss_aware", "fwsvd")
#: The strategies a recipe uses when it names none of their kind (SVD-LLM's truncation).
DEFAULTS = (Whitening, Uniform)


def _strategies(base: type) -> list[type]:
    found = []
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        found.extend(cls for cls in module.STRATEGIES if issubclass(cls, base))
    return found


@lowrank.hookimpl
def lowrank_register_scalings(register):
    for cls in _strategies(lowrank.Scaling):
        register(cls, default=cls in DEFAULTS)


@lowrank.hookimpl
def lowrank_register_allocators(register):
    for cls in _strategies(lowrank.Allocator):
        register(cls, default=cls in DEFAULTS)
