"""``lowrank recipe validate|show FILE``."""

from __future__ import annotations

import click

__all__ = ["recipe_group"]


@click.group("recipe")
def recipe_group() -> None:
    """Check and print recipe files."""


@recipe_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Exit 0 and print a summary if FILE is a valid recipe; otherwise print the error, exit 2."""
    from lowrank import Recipe

    recipe = Recipe.load(file)
    click.echo(f"valid: {recipe.summary()}")


@recipe_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
def show(file: str) -> None:
    """Print FILE normalized, with every default filled in (exit 2 if it is not a valid recipe)."""
    from lowrank import Recipe

    click.echo(Recipe.load(file).to_yaml(), nl=False)
