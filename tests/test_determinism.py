"""Determinism: on the CPU, two runs of the same recipe with the same seed write bit-identical
checkpoints (weights, config.json, recipe.yaml). docs/bad-input.md says what varies on a GPU."""

from __future__ import annotations

import pytest
from tiny_models import build, calibration

import lowrank

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

RECIPES = {
    "whitening+uniform": dict(),
    "asvd+whitening, global energy": dict(scalings=["asvd", "whitening"], allocator="energy"),
    "sigmascale (random init)": dict(scalings=[{"sigmascale": {"steps": 5}}], seed=11),
    "fwsvd+zero-sum (gradients)": dict(scalings=["fwsvd"], allocator={"zero-sum": {"gradient_seqlen": 16}}),
}


def _run(tmp_path, name: str, kwargs: dict, exporter: str) -> dict[str, bytes]:
    model = build("llama")
    recipe = lowrank.Recipe(ratio=0.3, exporter=exporter, **kwargs)
    lowrank.compress(model, recipe, calibration(4, 16), progress=False)
    out = lowrank.save(model, tmp_path / name)
    return {f: (out / f).read_bytes() for f in ("model.safetensors", "config.json", "recipe.yaml")}


@pytest.mark.parametrize("exporter", ["hf", "dense"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_recipe_same_seed_same_bytes(tmp_path, recipe, exporter):
    first = _run(tmp_path, "first", RECIPES[recipe], exporter)
    second = _run(tmp_path, "second", RECIPES[recipe], exporter)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs of {recipe}"
