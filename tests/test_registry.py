"""The pluggy registry: built-ins through the same hooks as third parties; names unique and kebab-case."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import lowrank
from lowrank import RegistryError, new_manager, reset_registry
from lowrank.cli import main


@pytest.fixture
def fresh_registry():
    yield
    reset_registry()


def test_plugins_json_lists_builtins():
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0
    listed = {(e["kind"], e["name"]): e["distribution"] for e in json.loads(result.output)}
    for key in [("scaling", "identity"), ("scaling", "asvd"), ("scaling", "whitening"),
                ("allocator", "uniform"), ("allocator", "energy"), ("exporter", "hf"), ("exporter", "dense")]:
        assert listed[key] == "lowrank"


class _Extra(lowrank.Scaling):
    """A test scaling."""

    name = "extra-scaling"

    def fit(self, weight, stats, rank=None):
        return lowrank.Transform()


def test_inline_plugin_registers_and_runs(fresh_registry):
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_scalings(self, register):
            register(_Extra)

    pm = new_manager()
    pm.register(Plugin(), name="inline")
    reg = reset_registry(pm)
    assert reg.get("scaling", "extra-scaling") is _Extra
    assert "extra-scaling" in reg.names("scaling")
    recipe = lowrank.Recipe(scalings=["extra-scaling"])
    assert recipe.scalings[0].name == "extra-scaling"


def test_name_clash_is_an_error(fresh_registry):
    class Clash(lowrank.Scaling):
        name = "whitening"

        def fit(self, weight, stats, rank=None):
            return lowrank.Transform()

    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_scalings(self, register):
            register(Clash)

    pm = new_manager()
    pm.register(Plugin(), name="clasher")
    with pytest.raises(RegistryError, match="two plugins register a scaling named 'whitening'"):
        reset_registry(pm)


@pytest.mark.parametrize("bad", ["Bad_Name", "x--y", "-x", ""])
def test_names_must_be_kebab_case(fresh_registry, bad):
    cls = type("Bad", (_Extra,), {"name": bad})

    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_scalings(self, register):
            register(cls)

    pm = new_manager()
    pm.register(Plugin(), name="bad")
    with pytest.raises(RegistryError, match="kebab-case"):
        reset_registry(pm)


def test_wrong_kind_is_an_error(fresh_registry):
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_allocators(self, register):
            register(_Extra)

    pm = new_manager()
    pm.register(Plugin(), name="wrong")
    with pytest.raises(RegistryError, match="expected a subclass of lowrank.Allocator"):
        reset_registry(pm)


def test_import_lowrank_is_light():
    import subprocess
    import sys

    code = "import sys, lowrank; print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_two_defaults_of_one_kind_are_an_error(fresh_registry):
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_scalings(self, register):
            register(_Extra, default=True)

    pm = new_manager()
    pm.register(Plugin(), name="greedy")
    with pytest.raises(RegistryError, match="default scaling"):
        reset_registry(pm)


def test_a_scaling_that_requires_an_unknown_statistic_is_refused(fresh_registry):
    class Typo(lowrank.Scaling):
        """Asks for a statistic nobody collects."""

        name = "typo-scaling"
        requires = frozenset({"abs_maen"})

        def fit(self, weight, stats, rank=None):
            return lowrank.Transform()

    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_scalings(self, register):
            register(Typo)

    pm = new_manager()
    pm.register(Plugin(), name="typo")
    with pytest.raises(RegistryError, match="abs_maen"):
        reset_registry(pm)
