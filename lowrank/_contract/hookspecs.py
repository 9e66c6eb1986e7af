"""The hooks a `lowrank` plugin implements.

Each hook hands the plugin a ``register`` callback (the simonw/llm pattern): a plugin calls
``register(SomeStrategyClass)`` once per strategy it provides and never touches a global
registry. The built-in strategies in ``plugins/lowrank_builtin`` use exactly these hooks.

A plugin module looks like::

    import lowrank

    @lowrank.hookimpl
    def lowrank_register_scalings(register):
        register(MyScaling)
"""

from __future__ import annotations

from typing import Protocol

import pluggy

__all__ = ["hookspec", "hookimpl", "Register"]

hookspec = pluggy.HookspecMarker("lowrank")
hookimpl = pluggy.HookimplMarker("lowrank")

class Register(Protocol):
    """The callback a hook receives: ``register(cls)``, or ``register(cls, default=True)`` for the
    strategy a recipe uses when it names none of that kind (the built-ins declare the defaults)."""

    def __call__(self, cls: type, *, default: bool = False) -> None: ...


@hookspec
def lowrank_register_scalings(register: Register) -> None:
    """Register :class:`lowrank.Scaling` subclasses (a change of basis applied before the SVD)."""


@hookspec
def lowrank_register_allocators(register: Register) -> None:
    """Register :class:`lowrank.Allocator` subclasses (which singular components each matrix keeps)."""


@hookspec
def lowrank_register_exporters(register: Register) -> None:
    """Register :class:`lowrank.Exporter` subclasses (write a compressed model and load it back)."""


@hookspec
def lowrank_register_corrections(register: Register) -> None:
    """Register :class:`lowrank.Correction` subclasses (change a block's factors after truncation)."""


@hookspec
def lowrank_register_presets(register) -> None:
    """Register presets: ``register(text, origin=...)`` with the YAML text of a recipe that has a
    ``preset`` mapping (name, description, reference); see :class:`lowrank.Preset`."""
