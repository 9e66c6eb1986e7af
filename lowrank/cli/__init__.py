"""The ``lowrank`` command line: one small module per verb, gathered here."""

from __future__ import annotations

import click

from .compress import compress_command
from .evaluate import eval_command
from .inspect import inspect_command
from .plugins import plugins_command
from .recipe import recipe_group

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowrank")
def main() -> None:
    """Compress LLM linear layers by truncated SVD after an activation-aware change of basis."""


main.add_command(plugins_command)
main.add_command(recipe_group)
main.add_command(compress_command)
main.add_command(eval_command)
main.add_command(inspect_command)
