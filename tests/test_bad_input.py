"""Bad input gets a clear error that says what was expected, and changes nothing."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build, calibration

import lowrank
from lowrank import CompressionError, RecipeError, RegistryError
from lowrank.cli import main


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    return state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state) and types == [type(m) for m in model.modules()]


def test_unknown_strategy_lists_names():
    with pytest.raises(RegistryError, match="unknown scaling 'whitenin'.*Did you mean 'whitening'.*asvd, .*identity, .*whitening"):
        lowrank.Recipe(scalings=["whitenin"])
    with pytest.raises(RegistryError, match="Registered allocators: .*uniform"):
        lowrank.Recipe(allocator="nope")


def test_unknown_key_and_wrong_types():
    with pytest.raises(RecipeError, match="unknown recipe key.*'ration'.*valid keys"):
        lowrank.Recipe.from_dict({"ration": 0.2})
    with pytest.raises(RecipeError, match="asvd.*alpha.*Valid settings: alpha, eps"):
        lowrank.Recipe(scalings=[{"asvd": {"alpha": "lots"}}])
    with pytest.raises(RecipeError, match="asvd.*beta"):
        lowrank.Recipe(scalings=[{"asvd": {"beta": 1}}])
    with pytest.raises(RecipeError, match="alpha"):
        lowrank.Recipe(scalings=[{"asvd": {"alpha": -1}}])
    with pytest.raises(RecipeError, match="seed"):
        lowrank.Recipe(seed="x")
    with pytest.raises(RecipeError, match="device"):
        lowrank.Recipe(device="tpu")


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, "0.2", True])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(RecipeError, match="ratio"):
        lowrank.Recipe(ratio=ratio)


def test_target_pattern_matching_nothing():
    model = build("llama")
    snap = _snapshot(model)
    with pytest.raises(CompressionError, match="match no linear layer.*q_proj"):
        lowrank.compress(model, lowrank.Recipe(targets=["attn.nothing"]), calibration(), progress=False)
    assert _unchanged(model, snap)


def test_nan_weights():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CompressionError, match="non-finite.*layers.1.mlp.up_proj"):
        lowrank.compress(model, lowrank.Recipe(), calibration(), progress=False)
    assert not any(isinstance(m, lowrank.LowRankLinear) for m in model.modules())


def test_calibration_shorter_than_one_window():
    from lowrank.data import calibration_windows

    with pytest.raises(ValueError, match="token"):
        calibration_windows(torch.arange(10), n=4, seqlen=32, seed=0)
    model = build("llama")
    with pytest.raises(CompressionError, match="at least one window"):
        lowrank.compress(model, lowrank.Recipe(), torch.zeros(1, 1, dtype=torch.long), progress=False)
    with pytest.raises(CompressionError, match="2-D integer"):
        lowrank.compress(model, lowrank.Recipe(), torch.zeros(4, 8), progress=False)


def test_failure_midway_restores_the_model(monkeypatch):
    """A scaling that fails on block 2 must leave blocks 0 and 1 as they were."""
    from lowrank_builtin.scalings import Whitening

    model = build("llama")
    snap = _snapshot(model)
    calls = {"n": 0}
    original_fit = Whitening.fit

    def flaky(self, weight, stats, rank=None):
        calls["n"] += 1
        if calls["n"] > 14:
            raise RuntimeError("boom")
        return original_fit(self, weight, stats, rank)

    monkeypatch.setattr(Whitening, "fit", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        lowrank.compress(model, lowrank.Recipe(), calibration(), progress=False)
    assert _unchanged(model, snap)
    assert not hasattr(model, "lowrank_report")


def test_output_directory_exists_and_not_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["compress", "some-model", "--out", str(out)])
    assert result.exit_code != 0
    assert "exists and is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
