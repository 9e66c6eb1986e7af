"""Presets: named recipes that reproduce a published method, shipped as YAML data by plugins.

A preset is a recipe file with one more top-level key, ``preset``, that says what it is::

    preset:
      name: svd-llm
      description: SVD-LLM (W) - whitening, the same ratio for every matrix, original inputs
      reference: Wang et al., SVD-LLM, ICLR 2025, arXiv 2403.07378
    scalings: [whitening]
    allocator: uniform
    inputs: original

Plugins register them through the hook ``lowrank_register_presets`` (``register(text)``), so the
core names no strategy: the built-in presets live beside the built-in strategies they use
(``lowrank_builtin/presets/*.yaml``). The text is read with the same strict safe loader as any
recipe file; the recipe itself is validated when it is used (``Recipe.preset``), because its
strategies resolve through the registry that is being built when the hook runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import RegistryError
from .recipe_file import parse_recipe_yaml

__all__ = ["Preset", "RegisterPreset", "parse_preset", "preset_registrar"]

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_META = ("name", "description", "reference")


class RegisterPreset(Protocol):
    """The callback ``lowrank_register_presets`` receives: ``register(text, origin=...)`` with the
    YAML text of one preset; ``origin`` (a file name) only makes error messages clearer."""

    def __call__(self, text: str, *, origin: str = "") -> None: ...


@dataclass(frozen=True)
class Preset:
    """A named recipe that reproduces a method with its published settings.

    Attributes:
        name: The preset's name (kebab-case), as ``lowrank compress --recipe NAME`` takes it.
        description: One line that says what the recipe does.
        reference: Where the method is published (paper, arXiv id).
        recipe: The recipe as plain data (what ``Recipe.from_dict`` reads).
        distribution: The package that registered it.
    """

    name: str
    description: str
    reference: str
    recipe: dict[str, Any] = field(repr=False)
    distribution: str = "lowrank"

    def to_yaml(self) -> str:
        """The preset as a recipe file: its name, description and reference as comments, then the
        recipe with every default filled in (``Recipe.load`` reads it back)."""
        from .recipe import Recipe

        head = f"# preset {self.name}: {self.description}\n# reference: {self.reference}\n"
        return head + Recipe.from_dict(self.recipe).to_yaml()


def parse_preset(text: str, origin: str = "", distribution: str = "lowrank") -> Preset:
    """A :class:`Preset` from its YAML text; a malformed one is a :class:`RegistryError`."""
    where = f"preset {origin or '(text)'}"
    try:
        data = parse_recipe_yaml(text)
    except Exception as err:  # RecipeError from the safe loader: a broken plugin file
        raise RegistryError(f"{where}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("preset"), dict):
        raise RegistryError(f"{where}: expected a recipe mapping with a 'preset' mapping "
                            f"({', '.join(_META)})")
    recipe = dict(data)
    meta = recipe.pop("preset")
    missing = [k for k in _META if not isinstance(meta.get(k), str) or not meta[k].strip()]
    unknown = sorted(set(map(str, meta)) - set(_META))
    if missing or unknown:
        raise RegistryError(f"{where}: the 'preset' mapping needs non-empty strings {', '.join(_META)}"
                            f" (missing: {missing or 'none'}; unknown keys: {unknown or 'none'})")
    if not _KEBAB.match(meta["name"]):
        raise RegistryError(f"{where}: name {meta['name']!r} is not kebab-case")
    recipe.setdefault("name", meta["name"])
    return Preset(meta["name"], " ".join(meta["description"].split()), " ".join(meta["reference"].split()),
                  recipe, distribution)


def preset_registrar(presets: dict[str, Preset], distribution: str, plugin: str) -> RegisterPreset:
    """The ``register`` callback handed to one plugin's ``lowrank_register_presets``."""

    def register(text: str, *, origin: str = "") -> None:
        if not isinstance(text, str):
            raise RegistryError(f"plugin {plugin!r} registered a preset that is not YAML text: {text!r}")
        preset = parse_preset(text, origin or plugin, distribution)
        existing = presets.get(preset.name)
        if existing is not None and existing.recipe != preset.recipe:
            raise RegistryError(f"two plugins register a preset named {preset.name!r}: "
                                f"{existing.distribution} and {distribution}; names must be unique")
        presets[preset.name] = preset

    return register  # type: ignore[return-value]
