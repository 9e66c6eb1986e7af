"""The ``lowrank`` command line: one small module per verb, gathered here.

Every command fails the same way (``_errors.py``): a one-paragraph ``Error:`` on stderr and an
exit code that says why; the traceback only with ``--debug`` or ``LOWRANK_DEBUG=1``. Results meant
for people go to stdout, progress bars and logs to stderr.
"""

from __future__ import annotations

from typing import Any

import click

from ._errors import report_failure
from .compress import compress_command
from .evaluate import eval_command
from .inspect import inspect_command
from .plugins import plugins_command
from .recipe import recipe_group

__all__ = ["main"]


class _Main(click.Group):
    """The group that turns every failure of a command into a message and an exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug is accepted anywhere before "--": `lowrank compress ... --debug` works too
        head = args[: args.index("--")] if "--" in args else args
        if "--debug" in head[1:]:
            args = ["--debug", *[a for a in head if a != "--debug"], *args[len(head):]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, GeneratorExit):
            raise
        except BaseException as err:  # KeyboardInterrupt included: exit 130, not click's "Aborted!"
            raise report_failure(ctx, err) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: 0 success; 1 failure (unexpected error, unreachable source); 2 bad "
                    "input or usage; 3 the machine cannot run it (device missing, out of memory, "
                    "write failed); 130 interrupted. See docs/bad-input.md.")
@click.version_option(package_name="lowrank")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of an error (also LOWRANK_DEBUG=1); anywhere on the line.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compress LLM linear layers by truncated SVD after an activation-aware change of basis."""
    ctx.meta["lowrank.debug"] = debug


main.add_command(plugins_command)
main.add_command(recipe_group)
main.add_command(compress_command)
main.add_command(eval_command)
main.add_command(inspect_command)
