"""Recipes: Python objects and their YAML twin."""

from __future__ import annotations

from click.testing import CliRunner

import lowrank
from lowrank.cli import main
from lowrank_builtin import ASVD, Energy, Whitening


def test_python_and_yaml_round_trip(tmp_path):
    recipe = lowrank.Recipe(scalings=[ASVD(alpha=0.7), Whitening(jitter=1e-5)], allocator=Energy(),
                            exporter="dense", ratio=0.35, targets=["re:.*proj$"], ignore=["*.o_proj"],
                            device="cpu", dtype="bfloat16", seed=7, inputs="original", name="mine")
    path = recipe.save(tmp_path / "r.yaml")
    again = lowrank.Recipe.load(path)
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()
    assert again.scalings[0].config.alpha == 0.7


def test_strings_mappings_and_objects_are_equivalent():
    a = lowrank.Recipe(scalings=["asvd"], allocator="uniform")
    b = lowrank.Recipe(scalings=[{"asvd": {"alpha": 0.5}}], allocator={"uniform": None})
    c = lowrank.Recipe(scalings=ASVD(), allocator=lowrank.get_registry().get("allocator", "uniform")())
    assert a == b == c


def test_defaults():
    r = lowrank.Recipe()
    assert [s.name for s in r.scalings] == ["whitening"]
    assert (r.allocator.name, r.exporter.name, r.ratio) == ("uniform", "hf", 0.2)


def test_cli_validate(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("scalings: [whitening]\nallocator: {energy: {fraction: 0.9}}\nratio: 0.4\n")
    result = CliRunner().invoke(main, ["recipe", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "0.4" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("scalings: [whitening]\nratio: 1.2\n")
    result = CliRunner().invoke(main, ["recipe", "validate", str(bad)])
    assert result.exit_code != 0
    assert "ratio" in result.output and "between 0 and 1" in result.output
    typo = tmp_path / "typo.yaml"
    typo.write_text("scaling: [whitening]\n")
    result = CliRunner().invoke(main, ["recipe", "validate", str(typo)])
    assert result.exit_code != 0 and "unknown recipe key" in result.output
