"""The plugin registry: one ``pluggy.PluginManager("lowrank")`` and a typed view of it.

Built-in strategies (``lowrank_builtin``) are registered through the same hooks as third-party
packages; third parties are discovered through the entry-point group ``lowrank``. Loading is lazy
and happens once, on first use, so ``import lowrank`` stays cheap.

Environment:
    LOWRANK_LOAD_PLUGINS: comma-separated entry-point names (or distribution names) to load; an empty
        string loads no third-party plugin. Unset loads them all.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import pluggy

from . import hookspecs
from .allocator import Allocator
from .correction import Correction
from .errors import RegistryError
from .exporter import Exporter
from .presets import Preset, preset_registrar
from .scaling import Scaling
from .stats import STATISTICS

__all__ = ["Kind", "KINDS", "BASES", "PluginEntry", "Registry", "get_registry", "reset_registry",
           "new_manager", "DEFAULT_PLUGINS"]

Kind = Literal["scaling", "allocator", "exporter", "correction"]
KINDS: tuple[Kind, ...] = ("scaling", "allocator", "exporter", "correction")
#: The one table from a kind to its base class and its hook.
BASES: dict[str, type] = {"scaling": Scaling, "allocator": Allocator, "exporter": Exporter,
                          "correction": Correction}
#: Modules registered as plugins on every manager, after the entry points: the core's formats and
#: the built-in strategies (a package of their own, ``plugins/lowrank_builtin``).
DEFAULT_PLUGINS = ("lowrank._formats.plugin", "lowrank_builtin")
_HOOK_OF_KIND = {
    "scaling": "lowrank_register_scalings",
    "allocator": "lowrank_register_allocators",
    "exporter": "lowrank_register_exporters",
    "correction": "lowrank_register_corrections",
}
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginEntry:
    """One registered strategy."""

    kind: Kind
    name: str
    cls: type
    distribution: str
    plugin: str
    default: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The entry as plain data (``lowrank plugins --json``)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "plugin": self.plugin,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "summary": (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else "",
            "default": self.default,
        }


class Registry:
    """Typed facade over the plugin manager: ``registry.get("scaling", "whitening")``."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self._entries: dict[Kind, dict[str, PluginEntry]] = {k: {} for k in KINDS}
        self._defaults: dict[Kind, PluginEntry] = {}
        self._presets: dict[str, Preset] = {}
        self._collect()

    def _distribution_of(self) -> dict[int, str]:
        dists = {id(plugin): dist.project_name for plugin, dist in self.manager.list_plugin_distinfo()}
        for name in DEFAULT_PLUGINS:
            plugin = self.manager.get_plugin(name)
            if plugin is not None:
                dists.setdefault(id(plugin), "lowrank")
        return dists

    def _collect(self) -> None:
        dists = self._distribution_of()
        for kind in KINDS:
            caller = getattr(self.manager.hook, _HOOK_OF_KIND[kind])
            for impl in caller.get_hookimpls():
                dist = dists.get(id(impl.plugin), "<unknown>")
                impl.function(register=self._registrar(kind, dist, impl.plugin_name))
        for impl in self.manager.hook.lowrank_register_presets.get_hookimpls():
            dist = dists.get(id(impl.plugin), "<unknown>")
            impl.function(register=preset_registrar(self._presets, dist, impl.plugin_name))

    def _registrar(self, kind: Kind, distribution: str, plugin: str) -> hookspecs.Register:
        base = BASES[kind]

        def register(cls: type, *, default: bool = False) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(cls, type) or not issubclass(cls, base):
                raise RegistryError(
                    f"plugin {plugin!r} registered {cls!r} as a {kind}; expected a subclass of "
                    f"lowrank.{base.__name__}"
                )
            if not isinstance(name, str) or not _KEBAB.match(name):
                raise RegistryError(
                    f"plugin {plugin!r}: {kind} {cls.__qualname__} has name {name!r}; names must be "
                    "kebab-case (lowercase letters, digits and single hyphens, e.g. 'my-scaling')"
                )
            declared = getattr(cls, "requires", ()) if kind == "scaling" else ()
            # a class-level set is checked here; a property (settings-dependent) when a recipe is built
            unknown = set(declared) - STATISTICS if isinstance(declared, (set, frozenset)) else set()
            if unknown:
                raise RegistryError(
                    f"plugin {plugin!r}: scaling {name!r} requires {sorted(unknown)}, which the engine "
                    f"does not collect; known statistics: {', '.join(sorted(STATISTICS))}"
                )
            existing = self._entries[kind].get(name)
            if existing is not None and existing.cls is not cls:
                raise RegistryError(
                    f"two plugins register a {kind} named {name!r}: {existing.distribution} "
                    f"({existing.cls.__module__}) and {distribution} ({cls.__module__}); "
                    "names must be unique, block one with LOWRANK_LOAD_PLUGINS"
                )
            entry = PluginEntry(kind, name, cls, distribution, plugin, default)
            if default:
                previous = self._defaults.get(kind)
                if previous is not None and previous.cls is not cls:
                    raise RegistryError(
                        f"two plugins declare the default {kind}: {previous.name!r} ({previous.distribution}) "
                        f"and {name!r} ({distribution}); only one may"
                    )
                self._defaults[kind] = entry
            self._entries[kind][name] = entry

        return register  # type: ignore[return-value]

    def default(self, kind: Kind) -> type | None:
        """The strategy a recipe uses when it names none of ``kind`` (None: the kind is optional)."""
        entry = self._defaults.get(kind)
        return None if entry is None else entry.cls

    def names(self, kind: Kind) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return sorted(self._entries[kind])

    def entries(self, kind: Kind | None = None) -> list[PluginEntry]:
        """Every entry (of ``kind``), by kind then name."""
        kinds = KINDS if kind is None else (kind,)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def presets(self) -> list[Preset]:
        """Every registered preset, by name."""
        return [self._presets[n] for n in sorted(self._presets)]

    def preset(self, name: str) -> Preset:
        """The preset registered as ``name``; an unknown name lists the ones that exist."""
        try:
            return self._presets[name]
        except KeyError:
            known = sorted(self._presets)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(f"unknown preset {name!r}.{hint} Presets: {', '.join(known) or '(none)'}; "
                                "`lowrank recipe list` shows them.") from None

    def get(self, kind: Kind, name: str) -> type:
        """The strategy class registered as ``name``; an unknown name lists the ones that exist."""
        try:
            return self._entries[kind][name].cls
        except KeyError:
            known = self.names(kind)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(known) or '(none)'}. "
                "`lowrank plugins` lists every strategy and the package that provides it."
            ) from None


def _make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("lowrank")
    pm.add_hookspecs(hookspecs)
    wanted = os.environ.get("LOWRANK_LOAD_PLUGINS")
    if wanted is None:
        pm.load_setuptools_entrypoints("lowrank")
    elif wanted.strip():
        for name in (n.strip() for n in wanted.split(",")):
            if name:
                pm.load_setuptools_entrypoints("lowrank", name=name)
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    pm.check_pending()
    return pm


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry(_make_manager())
    return _REGISTRY


def reset_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Rebuild the registry (tests and plugin authors register extra plugins on ``manager``)."""
    global _REGISTRY
    _REGISTRY = Registry(manager if manager is not None else _make_manager())
    return _REGISTRY


def new_manager() -> pluggy.PluginManager:
    """A fresh manager with the entry points and built-ins loaded, for registering more plugins."""
    return _make_manager()
