"""The documentation keeps up with the code.

- every registered built-in strategy (distribution ``lowrank``) has a page ``docs/strategies/<name>.md``
  in the site's navigation, with its generated settings table;
- every public name of ``lowrank`` and ``lowrank.data`` that is a class or a function has a
  docstring of its own;
- the tutorial notebooks exist, import only the public API (``lowrank``, ``lowrank.data`` and the
  built-in strategies' ``lowrank_builtin``), and are committed executed (every
  code cell ran, at least one plot).

``mkdocs build --strict`` and the execution of the notebooks run in ``.ci/run``.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

import lowrank
import lowrank.data

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = DOCS / "tutorials"
NOTEBOOKS = (
    "01-compress-in-ten-lines.ipynb",
    "02-mixing-strategies.ipynb",
    "03-write-a-plugin.ipynb",
    "04-looking-inside.ipynb",
    "05-your-own-model-and-data.ipynb",
)


def _builtin_entries():
    return [e for e in lowrank.get_registry().entries(None) if e.distribution == "lowrank"]


def test_every_builtin_strategy_has_a_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    problems = []
    for entry in _builtin_entries():
        page = DOCS / "strategies" / f"{entry.name}.md"
        if not page.exists():
            problems.append(f"{entry.kind} {entry.name!r}: no page {page.relative_to(ROOT)}")
            continue
        if f"strategies/{entry.name}.md" not in nav:
            problems.append(f"{entry.kind} {entry.name!r}: {page.relative_to(ROOT)} is not in mkdocs.yml's nav")
        marker = f"<!-- lowrank:settings {entry.kind} {entry.name} -->"
        if marker not in page.read_text(encoding="utf-8"):
            problems.append(f"{entry.kind} {entry.name!r}: the page lacks its settings table ({marker})")
    assert not problems, "\n".join(problems)


def test_the_builtins_are_found():
    names = {(e.kind, e.name) for e in _builtin_entries()}
    assert {("scaling", "whitening"), ("allocator", "uniform"), ("exporter", "hf")} <= names


def _own_docstring(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        if "__doc__" not in vars(obj) or not vars(obj)["__doc__"]:
            return ""
        # a dataclass without a docstring gets its signature as one
        if re.fullmatch(rf"{re.escape(obj.__name__)}\(.*\)", doc, re.S):
            return ""
    return doc.strip()


def _public(module):
    for name in module.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            yield f"{module.__name__}.{name}", obj


def test_every_public_name_has_a_docstring():
    missing = [name for module in (lowrank, lowrank.data) for name, obj in _public(module) if not _own_docstring(obj)]
    assert not missing, f"public names without a docstring: {missing}"


def _notebook(name: str) -> dict:
    return json.loads((TUTORIALS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_uses_only_the_public_api(name):
    nb = _notebook(name)
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        assert "lowrank._" not in source, f"{name}: a cell names a private module"
        for module in re.findall(r"^\s*(?:from|import)\s+(lowrank[\w.]*)", source, re.M):
            assert module in ("lowrank", "lowrank.data", "lowrank_builtin"), f"{name}: imports {module}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_is_committed_executed(name):
    nb = _notebook(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name}: no code cell"
    not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None and "".join(c["source"]).strip()]
    assert not not_run, f"{name}: code cells {not_run} were not executed"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: committed with an error output"
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{name}: no plot in the outputs"


def test_no_page_names_a_private_module():
    offenders = [str(p.relative_to(ROOT)) for p in DOCS.rglob("*") if p.suffix in {".md", ".ipynb", ".py"}
                 and "lowrank._" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
