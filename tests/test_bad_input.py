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


# -- rows of docs/bad-input.md through the Python API -----------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_explicit_device_that_is_not_there(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build("llama")
    snap = _snapshot(model)
    with pytest.raises(lowrank.DeviceError, match=f"device '{device}' was asked for.*'auto', which picks CUDA"):
        lowrank.compress(model, lowrank.Recipe(device=device), calibration(), progress=False)
    with pytest.raises(lowrank.DeviceError):
        lowrank.preflight(model, lowrank.Recipe(device=device))
    with pytest.raises(lowrank.DeviceError):
        lowrank.resolve_device(device)
    assert _unchanged(model, snap)
    assert lowrank.resolve_device("auto")[0].type == "cpu"  # only auto falls back


def test_preflight_checks_everything_before_a_forward_pass():
    model = build("llama")
    targets = lowrank.preflight(model, lowrank.Recipe(targets=["q_proj"]), calibration())
    assert [t.name for t in targets] == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    with pytest.raises(CompressionError, match="match no linear layer"):
        lowrank.preflight(model, lowrank.Recipe(targets=["nothing"]))
    with pytest.raises(CompressionError, match="token ids must lie in"):
        lowrank.preflight(model, lowrank.Recipe(), calibration() + 1000)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[1, 2] = float("inf")
    with pytest.raises(CompressionError, match="non-finite.*layers.0.mlp.down_proj"):
        lowrank.preflight(model)


def test_unsupported_architecture():
    model = build("llama")
    model.model.layers = torch.nn.Sequential(*model.model.layers)
    with pytest.raises(CompressionError, match=r"unsupported architecture LlamaForCausalLM: .*nn.ModuleList of 3 "
                                               r"modules .*found no nn.ModuleList at all"):
        lowrank.compress(model, lowrank.Recipe(), calibration(), progress=False)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(CompressionError, match="unsupported architecture Sequential"):
        lowrank.preflight(plain)


def test_windows_longer_than_the_context():
    from lowrank.data import perplexity

    model = build("gpt2")  # 64 positions
    with pytest.raises(CompressionError, match="windows of 65 tokens are longer than the model's context of 64"):
        lowrank.compress(model, lowrank.Recipe(), calibration(2, 65), progress=False)
    with pytest.raises(ValueError, match="evaluation windows of 80 tokens are longer than the model's context of 64"):
        perplexity(model, calibration(1, 80), progress=False)


def test_empty_calibration_source(tmp_path):
    from bad_input_kit import byte_tokenizer

    from lowrank.data import load_text, load_windows

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(f"file:{empty}")
    with pytest.raises(ValueError, match="is empty"):
        load_windows(byte_tokenizer(), f"file:{empty}", "calibration", 4, 32)
    with pytest.raises(CompressionError, match="at least one window"):
        lowrank.compress(build("llama"), lowrank.Recipe(), torch.zeros(0, 32, dtype=torch.long), progress=False)


def test_cuda_index_beyond_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(lowrank.DeviceError, match=r"device 'cuda:3' was asked for, but this machine has 1 CUDA "
                                                  r"device\(s\) \(cuda:0 to cuda:0\)"):
        lowrank.resolve_device("cuda:3")
    with pytest.raises(lowrank.DeviceError, match="expected auto, cpu, cuda, cuda:N or mps"):
        lowrank.resolve_device("tpu")
