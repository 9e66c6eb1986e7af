"""Presets: recipes named after the methods they reproduce, shipped as YAML data by plugins."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import lowrank
from lowrank import Recipe, RecipeError, RegistryError, new_manager, reset_registry
from lowrank.cli import main

NAMES = {"svd-llm", "asvd", "zs-svd", "zs-svd-multistage", "sigmascale", "aa-svd", "soco", "recommended"}


def test_every_preset_is_registered_loads_and_validates():
    presets = {p.name: p for p in lowrank.get_registry().presets()}
    assert NAMES <= set(presets)
    for name, preset in presets.items():
        assert preset.description and "\n" not in preset.description
        assert "arXiv" in preset.reference and preset.distribution == "lowrank"
        recipe = Recipe.preset(name)
        assert recipe.name == name
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        assert Recipe.from_yaml(preset.to_yaml()) == recipe   # `recipe show NAME` is a recipe file


def test_presets_say_what_the_papers_do():
    svd_llm = Recipe.preset("svd-llm")
    assert [s.name for s in svd_llm.scalings] == ["whitening"] and svd_llm.allocator.name == "uniform"
    assert svd_llm.inputs == "original" and not svd_llm.corrections
    assert Recipe.preset("zs-svd").allocator.config.stages == 1
    assert Recipe.preset("zs-svd-multistage").allocator.config.stages == 6
    assert Recipe.preset("asvd").scalings[0].name == "asvd"
    assert Recipe.preset("sigmascale").allocator.name == "sensitivity"
    aa = Recipe.preset("aa-svd")
    assert [c.name for c in aa.corrections] == ["aa-svd"] and aa.allocator.name == "uniform"
    assert aa.corrections[0].config.epochs is None   # the published schedule on CUDA
    soco = Recipe.preset("soco")
    assert soco.allocator.name == "soco" and soco.allocator.config.steps is None   # full on CUDA, CPU-sized elsewhere
    best = Recipe.preset("recommended")
    assert best.allocator.name == "zero-sum" and [c.name for c in best.corrections] == ["aa-svd"]


def test_overrides_and_unknown_names():
    recipe = Recipe.preset("svd-llm", ratio=0.4, device="cpu")
    assert recipe.ratio == 0.4 and recipe.device == "cpu" and recipe.inputs == "original"
    with pytest.raises(RegistryError, match="Did you mean 'svd-llm'"):
        Recipe.preset("svd-lm")
    with pytest.raises(RecipeError, match="preset 'svd-llm'.*ratio"):
        Recipe.preset("svd-llm", ratio=2.0)


def test_cli_recipe_list_and_show():
    result = CliRunner().invoke(main, ["recipe", "list"])
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.output
    assert "arXiv 2403.07378" in result.output and "arXiv 2602.02848" in result.output
    shown = CliRunner().invoke(main, ["recipe", "show", "zs-svd-multistage"])
    assert shown.exit_code == 0 and shown.output.startswith("# preset zs-svd-multistage")
    assert Recipe.from_yaml(shown.output) == Recipe.preset("zs-svd-multistage")
    valid = CliRunner().invoke(main, ["recipe", "validate", "aa-svd"])
    assert valid.exit_code == 0 and valid.output.startswith("valid: recipe 'aa-svd'")


def test_cli_compress_takes_a_preset_name(monkeypatch, tmp_path):
    import lowrank.cli.compress as command

    seen = {}
    monkeypatch.setattr(command, "_run", lambda model, recipe, *a: seen.setdefault("recipe", recipe) and {})
    result = CliRunner().invoke(main, ["compress", "any-model", "--recipe", "svd-llm", "--ratio", "0.4",
                                       "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert seen["recipe"] == Recipe.preset("svd-llm", ratio=0.4, device="cpu")
    bad = CliRunner().invoke(main, ["compress", "any-model", "--recipe", "svd-lm", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "neither a recipe file nor a preset" in bad.output
    assert "Did you mean 'svd-llm'" in bad.output
    missing = CliRunner().invoke(main, ["compress", "any-model", "--recipe", "nope.yaml", "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


GOOD = """
preset: {name: my-preset, description: a third party's recipe, reference: 'Someone, arXiv 0000.00000'}
scalings: [whitening]
ratio: 0.3
"""


def _registry_with(*texts: str):
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_presets(self, register):
            for text in texts:
                register(text, origin="test")

    pm = new_manager()
    pm.register(Plugin(), name="test-presets")
    return reset_registry(pm)


def test_a_third_party_registers_a_preset():
    try:
        registry = _registry_with(GOOD)
        assert registry.preset("my-preset").reference == "Someone, arXiv 0000.00000"
        assert Recipe.preset("my-preset").ratio == 0.3
        assert "svd-llm" in {p.name for p in registry.presets()}
    finally:
        reset_registry()


@pytest.mark.parametrize("text, message", [
    ("scalings: [whitening]\n", "'preset' mapping"),
    ("preset: {name: x-y, description: d}\n", "reference"),
    ("preset: {name: Bad_Name, description: d, reference: r}\n", "kebab-case"),
    ("preset: {name: a, description: d, reference: r, extra: 1}\n", "unknown keys"),
    ("preset: !!python/object/apply:os.system ['true']\n", "preset test"),
    ("preset: {name: svd-llm, description: d, reference: r}\nratio: 0.5\n", "two plugins"),
])
def test_malformed_presets_are_refused(text, message):
    try:
        with pytest.raises(RegistryError, match=message):
            _registry_with(text)
    finally:
        reset_registry()
