"""Registers the core's two formats as exporters, through the same hook a third party uses."""

from __future__ import annotations

from .._contract.hookspecs import Register, hookimpl
from .dense import DenseExporter
from .hf import HFExporter


@hookimpl
def lowrank_register_exporters(register: Register) -> None:
    """``hf`` (the default) and ``dense``."""
    register(HFExporter, default=True)
    register(DenseExporter)
