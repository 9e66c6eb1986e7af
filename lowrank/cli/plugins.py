"""``lowrank plugins``: every registered strategy and the package that provides it."""

from __future__ import annotations

import json

import click

__all__ = ["plugins_command"]


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (kind, name, distribution, ...).")
@click.option("--kind", type=click.Choice(["scaling", "allocator", "correction", "exporter"]), help="Only this kind.")
def plugins_command(as_json: bool, kind: str | None) -> None:
    """List registered scalings, allocators, corrections and exporters (* marks a default)."""
    from lowrank import get_registry

    entries = get_registry().entries(kind)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    for e in entries:
        summary = e.as_dict()["summary"]
        name = f"{e.name}*" if e.default else e.name
        click.echo(f"{e.kind:<10} {name:<16} {e.distribution:<24} {summary}")
