"""``lowrank recipe list|validate|show``: presets and recipe files."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["recipe_group", "recipe_from"]


def _is_file_name(value: str) -> bool:
    """An existing path, or a value that looks like one (a folder separator, a YAML suffix)."""
    path = Path(value)
    return path.exists() or "/" in value or path.suffix.lower() in (".yaml", ".yml")


def _preset(value: str):
    from lowrank import RecipeError, RegistryError, get_registry

    try:
        return get_registry().preset(value)
    except RegistryError as err:
        raise RecipeError(f"{value!r} is neither a recipe file nor a preset: {err}") from None


def recipe_from(value: str):
    """The recipe a ``--recipe`` value names: a recipe file, or else a preset's name.

    A value that is not an existing file and looks like a path (a folder separator or a ``.yaml``
    / ``.yml`` suffix) fails as a missing file; any other unknown value lists the presets.
    """
    from lowrank import Recipe

    if _is_file_name(value):
        return Recipe.load(value)
    return Recipe.preset(_preset(value).name)


@click.group("recipe")
def recipe_group() -> None:
    """List presets; check and print recipe files and presets."""


@recipe_group.command("list")
def list_presets() -> None:
    """List the presets (recipes named after the method they reproduce) with their reference."""
    from lowrank import get_registry

    for preset in get_registry().presets():
        click.echo(f"{preset.name:<20} {preset.description}")
        click.echo(f"{'':<20} reference: {preset.reference}")


@recipe_group.command("validate")
@click.argument("recipe")
def validate(recipe: str) -> None:
    """Exit 0 and print a summary if RECIPE (a file or a preset name) is valid; otherwise print the
    error, exit 2."""
    click.echo(f"valid: {recipe_from(recipe).summary()}")


@recipe_group.command("show")
@click.argument("recipe")
def show(recipe: str) -> None:
    """Print RECIPE (a file or a preset name) normalized, with every default filled in (exit 2 if
    it is not a valid recipe); a preset starts with its description and reference as comments."""
    if _is_file_name(recipe):
        click.echo(recipe_from(recipe).to_yaml(), nl=False)
    else:
        click.echo(_preset(recipe).to_yaml(), nl=False)
