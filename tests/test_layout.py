"""The house rules that a reader relies on: small modules and functions, one public API.

A module of ``lowrank/`` over 300 lines or a function over 60 must say why in its docstring
(a line starting with ``Long because``); every public name resolves and has a docstring; and
``import lowrank`` stays light.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank
import lowrank.data

ROOT = Path(__file__).resolve().parents[1]
MODULE_LINES, FUNCTION_LINES = 300, 60


def _explained(docstring: str | None) -> bool:
    return any(line.strip().startswith("Long because") for line in (docstring or "").splitlines())


def _sources() -> list[Path]:
    return sorted((ROOT / "lowrank").rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MODULE_LINES or _explained(ast.get_docstring(tree)), f"{path}: {lines} lines"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= FUNCTION_LINES or _explained(ast.get_docstring(node)), (
                f"{path}:{node.lineno} {node.name} is {length} lines")


@pytest.mark.parametrize("namespace", [lowrank, lowrank.data], ids=lambda m: m.__name__)
def test_every_public_name_resolves_once_and_is_documented(namespace):
    names = namespace.__all__
    assert len(names) == len(set(names))
    for name in names:
        value = getattr(namespace, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert (value.__doc__ or "").strip(), f"{namespace.__name__}.{name} has no docstring"


def test_the_lazy_table_and_all_agree():
    lazy = {name for names in lowrank._EXPORTS.values() for name in names}
    assert set(lowrank.__all__) == lazy | {"hookimpl", "install_transformers_hook", "__version__"}


def test_import_lowrank_stays_light():
    code = "import sys, lowrank; print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
