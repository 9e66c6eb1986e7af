"""How the command line fails: one paragraph on stderr, an exit code that says why, and a
traceback only with ``--debug`` or ``LOWRANK_DEBUG=1``.

Exit codes (docs/bad-input.md): 0 success; 1 a failure that is not the input's fault (an
unexpected error, a source that cannot be fetched); 2 bad input or usage (a recipe, model,
checkpoint, text source or output directory that cannot be used; click's own usage errors are 2
too); 3 the machine cannot run it (the requested device is not there, out of memory, a write
failed); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import sys
import traceback

import click

__all__ = ["EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_ENVIRONMENT", "EXIT_INTERRUPTED", "CommandError",
           "debug_enabled", "translate", "report_failure"]

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 1, 2, 3, 130
_DEBUG_HINT = "rerun with --debug (or LOWRANK_DEBUG=1) for the traceback"


class CommandError(click.ClickException):
    """A failure of a command, shown as ``Error: <one paragraph>`` on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """``--debug`` was given, or ``LOWRANK_DEBUG`` is set to something true."""
    if ctx is not None and ctx.meta.get("lowrank.debug"):
        return True
    return os.environ.get("LOWRANK_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _paragraph(text: str) -> str:
    """At most one paragraph: blank lines dropped, trailing spaces trimmed."""
    lines = [line.rstrip() for line in str(text).strip().splitlines()]
    return "\n".join(line for line in lines if line) or "(no message)"


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


def translate(err: BaseException) -> CommandError:
    """The :class:`CommandError` (message and exit code) for an exception raised by a command."""
    from lowrank import DeviceError, LowrankError

    if isinstance(err, KeyboardInterrupt):
        return CommandError("interrupted (Ctrl-C); nothing was written", EXIT_INTERRUPTED)
    if isinstance(err, DeviceError):
        return CommandError(_paragraph(str(err)), EXIT_ENVIRONMENT)
    if isinstance(err, LowrankError):
        return CommandError(_paragraph(str(err)), EXIT_BAD_INPUT)
    if _is_out_of_memory(err):
        return CommandError(
            f"out of memory ({_paragraph(str(err)).splitlines()[0][:200]}); nothing was written. Try a "
            "smaller --batch-size, fewer or shorter windows (--calib-windows, --seqlen), 'inputs: "
            "original' in the recipe, or --device cpu", EXIT_ENVIRONMENT)
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeError, ValueError)):
        return CommandError(_paragraph(str(err)), EXIT_BAD_INPUT)
    if isinstance(err, OSError):
        what = err.strerror or str(err)
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return CommandError(f"{what}{where}; nothing was written (a partial output directory is "
                            "removed)", EXIT_ENVIRONMENT)
    if isinstance(err, RuntimeError) and type(err) is RuntimeError:
        return CommandError(_paragraph(str(err)), EXIT_FAILURE)
    return CommandError(f"unexpected {type(err).__name__}: {_paragraph(str(err))} (this is a bug in "
                        f"lowrank or a plugin; {_DEBUG_HINT})", EXIT_FAILURE)


def report_failure(ctx: click.Context, err: BaseException) -> CommandError:
    """Print the traceback when debugging, and return the error to raise in its place."""
    if debug_enabled(ctx):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    return translate(err)
