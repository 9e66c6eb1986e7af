"""mkdocs hook: pages generated from the code at build time, so they cannot drift from it.

Markers a page may contain:

- ``<!-- lowrank:settings KIND NAME -->``: the settings table of a registered strategy, read from
  its ``Config`` dataclass (name, type and allowed values, default, description);
- ``<!-- lowrank:summary KIND NAME -->``: the strategy's one-line summary and where it comes from
  (the distribution, the class, whether it is the kind's default);
- ``<!-- lowrank:strategies -->``: a table of every registered strategy with a link to its page;
- ``<!-- lowrank:names KIND -->`` (inline): the registered strategies of a kind, linked, the default marked;
- ``<!-- lowrank:api-unlisted -->``: a ``::: lowrank.NAME`` entry for every public name that the
  page does not list yet (so a new public name is documented even before someone files it);
- ``<!-- lowrank:bench-plots -->``: every committed plot ``bench/results/*.png`` with the title of
  its result file.

``on_files`` copies ``bench/results/*.png`` into the site as ``assets/bench/*.png``.

A ``::: mkdocs-click`` block is expanded here with mkdocs-click's own generator rather than by its
Markdown extension, so that the help texts can be escaped first: click's help has ``<MODEL name>``
style placeholders that Markdown would swallow as HTML tags, and click 8.2's ``UNSET`` default
would print as ``Sentinel.UNSET``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "results"
MARKER = re.compile(r"<!-- lowrank:(\S+)((?: \S+)*) -->")
KINDS = ("scaling", "allocator", "correction", "exporter")


def _registry():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lowrank

    return lowrank.get_registry()


def _builtin(kind: str):
    """The strategies of a kind that ship with lowrank (a third-party plugin has no page here)."""
    return [e for e in _registry().entries(kind) if e.distribution == "lowrank"]


def _entry(kind: str, name: str):
    for entry in _registry().entries(kind):
        if entry.name == name:
            return entry
    raise ValueError(f"no registered {kind} named {name!r}")


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"tuple[{inner}]"
    if annotation is type(None):
        return "`null`"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _constraints(info) -> str:
    parts = []
    for item in getattr(info, "metadata", []):
        for attr, sign in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(parts)


def _default(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(_default(v).strip("`") for v in value) + "]`"
    return f"`{value}`"


def settings_table(kind: str, name: str) -> str:
    """The Markdown table of a strategy's settings, from its ``Config`` dataclass."""
    entry = _entry(kind, name)
    config = getattr(entry.cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config) or not dataclasses.fields(config):
        return f"`{name}` has no settings: write it as `{name}` in a recipe."
    infos = getattr(config, "__pydantic_fields__", {})
    rows = ["| setting | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(config):
        info = infos.get(field.name)
        default = info.get_default(call_default_factory=True) if info is not None else field.default
        description = (getattr(info, "description", None) or "").replace("|", "\\|")
        annotation = info.annotation if info is not None else field.type
        rows.append(f"| `{field.name}` | {_type_name(annotation)} | {_constraints(info)} | "
                    f"{_default(default)} | {description} |")
    example = ", ".join(f"{f.name}: ..." for f in dataclasses.fields(config)[:2])
    rows.append("")
    rows.append(f"In a recipe: `{{{name}: {{{example}}}}}`; in Python: `{entry.cls.__name__}(...)` with the "
                f"same keywords. Every setting left out takes its default.")
    return "\n".join(rows)


def summary(kind: str, name: str) -> str:
    entry = _entry(kind, name)
    default = f" It is the default {kind}." if entry.default else ""
    text = entry.as_dict()["summary"]
    module = entry.cls.__module__
    if any(part.startswith("_") for part in module.split(".")):  # the core's own formats
        where = "Built into the core: `lowrank.save` and `lowrank.load` use it."
    else:
        where = f"Class `{module}.{entry.cls.__qualname__}`."
    article = "an" if kind[0] in "aeiou" else "a"
    return (f"!!! info \"`{name}`: {article} {kind} from `{entry.distribution}`\"\n"
            f"    {text}\n\n"
            f"    {where}{default}")


def strategies_table(page_uri: str) -> str:
    rows = ["| kind | name | summary |", "|---|---|---|"]
    depth = page_uri.count("/")
    prefix = "../" * depth
    for kind in KINDS:
        for entry in _builtin(kind):
            star = " (default)" if entry.default else ""
            link = f"[`{entry.name}`]({prefix}strategies/{entry.name}.md){star}"
            rows.append(f"| {kind} | {link} | {entry.as_dict()['summary']} |")
    return "\n".join(rows)


def names(kind: str, page_uri: str) -> str:
    prefix = "../" * page_uri.count("/")
    found = [f"[`{e.name}`]({prefix}strategies/{e.name}.md)" + (" (default)" if e.default else "")
             for e in _builtin(kind)]
    return ", ".join(found) or "none registered"


def api_unlisted(markdown: str) -> str:
    import lowrank

    listed = set(re.findall(r"^::: lowrank\.(\w+)\s*$", markdown, re.M))
    skip = {"__version__"}
    public = vars(lowrank)["__all__"]
    missing = [n for n in public if n not in listed and n not in skip]
    if not missing:
        return ""
    return "\n".join(f"::: lowrank.{n}" for n in missing)


def _bench_title(png: Path) -> str:
    for candidate in (png.with_suffix(".md"), png.with_name(png.stem.rsplit("-", 1)[0] + ".md")):
        if candidate.exists():
            for line in candidate.read_text(encoding="utf-8").splitlines():
                if line.startswith("#"):
                    return line.lstrip("# ").strip()
    return png.stem


def bench_plots(page_uri: str) -> str:
    prefix = "../" * page_uri.count("/")
    out = []
    for png in sorted(BENCH.glob("*.png")):
        out.append(f"### `{png.name}`\n\n{_bench_title(png)}\n\n"
                   f"![{png.stem}]({prefix}assets/bench/{png.name})\n")
    return "\n".join(out) if out else "No plot is committed yet."


CLICK_BLOCK = re.compile(r"^::: mkdocs-click\n((?:    :\w+:.*\n?)+)", re.M)


def click_docs(match: re.Match) -> str:
    import importlib

    from mkdocs_click._docs import make_command_docs

    options = dict(re.findall(r"^    :(\w+): *(.*)$", match.group(1), re.M))
    command = getattr(importlib.import_module(options["module"]), options["command"])
    lines = make_command_docs(
        prog_name=options.get("prog_name", command.name), command=command,
        depth=int(options.get("depth", 0)), style=options.get("style", "plain"),
        list_subcommands=options.get("list_subcommands", "false").lower() == "true", has_attr_list=True)
    subcommands = getattr(command, "commands", {})
    out, fenced = [], False
    for line in lines:
        bullet = re.match(r"^- \*\[(\S+)\]\((#\S+)\)\*: ", line)
        if bullet and bullet.group(1) in subcommands:  # the whole first sentence, not the first line
            line = bullet.group(0) + subcommands[bullet.group(1)].get_short_help_str(limit=150)
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            line = line.replace("`Sentinel.UNSET`", "").replace("<", "&lt;").replace(">", "&gt;")
        out.append(line)
    return "\n".join(out) + "\n"


def on_files(files, config):
    from mkdocs.structure.files import File

    for png in sorted(BENCH.glob("*.png")):
        files.append(File.generated(config, f"assets/bench/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri

    def replace(match: re.Match) -> str:
        what, args = match.group(1), match.group(2).split()
        if what == "settings":
            return settings_table(*args)
        if what == "summary":
            return summary(*args)
        if what == "strategies":
            return strategies_table(uri)
        if what == "names":
            return names(args[0], uri)
        if what == "api-unlisted":
            return api_unlisted(markdown)
        if what == "bench-plots":
            return bench_plots(uri)
        raise ValueError(f"{uri}: unknown marker lowrank:{what}")

    markdown = CLICK_BLOCK.sub(click_docs, markdown)
    return MARKER.sub(replace, markdown)
