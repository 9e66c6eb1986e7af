"""The strategies that ship with `lowrank`, registered through the same hooks a third party uses.

Each module listed in ``MODULES`` defines ``STRATEGIES``, the classes it provides; the hooks
below register every one of them under its kind. The presets (recipes named after the methods they
reproduce) are YAML files in ``presets/``, registered as data through ``lowrank_register_presets``.
"""

from __future__ import annotations

import importlib
import importlib.resources

import lowrank

from .allocators import Energy, Uniform
from .scalings import ASVD, Identity, Whitening

__all__ = ["Identity", "ASVD", "Whitening", "Uniform", "Energy", "MODULES", "DEFAULTS"]

MODULES = ("scalings", "allocators", "sigmascale", "sensitivity", "zero_sum", "loss_aware", "fwsvd",
           "block_training", "soco")
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


@lowrank.hookimpl
def lowrank_register_corrections(register):
    for cls in _strategies(lowrank.Correction):
        register(cls)


@lowrank.hookimpl
def lowrank_register_presets(register):
    # presets are data: files of this package, read as text (never imported)
    folder = importlib.resources.files(__name__) / "presets"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            register(entry.read_text(encoding="utf-8"), origin=f"lowrank_builtin/presets/{entry.name}")
