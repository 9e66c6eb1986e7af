"""The strategies that ship with `lowrank`, registered through the same hooks a third party uses."""

from __future__ import annotations

import lowrank

from .allocators import Energy, Uniform
from .exporters import DenseExporter, HFExporter
from .scalings import ASVD, Identity, Whitening

__all__ = ["Identity", "ASVD", "Whitening", "Uniform", "Energy", "HFExporter", "DenseExporter"]


@lowrank.hookimpl
def lowrank_register_scalings(register):
    for cls in (Identity, ASVD, Whitening):
        register(cls)


@lowrank.hookimpl
def lowrank_register_allocators(register):
    for cls in (Uniform, Energy):
        register(cls)


@lowrank.hookimpl
def lowrank_register_exporters(register):
    for cls in (HFExporter, DenseExporter):
        register(cls)
