"""The fourth kind: corrections run per block after truncation, registered like any strategy."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calibration

import lowrank
from lowrank import CompressionError, new_manager, reset_registry

pytestmark = pytest.mark.usefixtures("single_thread")


class Probe(lowrank.Correction):
    """Records what the engine hands it (a probe, not a real correction)."""

    name = "test-refit"
    calls: list[int] = []

    def correct(self, context: lowrank.BlockCorrectionContext) -> None:
        Probe.calls.append(context.index)
        assert context.factored and len(context.original_outputs) == len(context.inputs.hidden)
        for name, layer in context.factored.items():
            assert isinstance(layer, lowrank.LowRankLinear) and name.startswith("model.layers.")
        context.notes.append(f"refit block {context.index}")


class Grow(lowrank.Correction):
    """A broken correction: it grows a rank."""

    name = "test-grow"

    def correct(self, context: lowrank.BlockCorrectionContext) -> None:
        layer = next(iter(context.factored.values()))
        layer.A = torch.nn.Parameter(torch.cat([layer.A, layer.A[:, :1]], 1))
        layer.B = torch.nn.Parameter(torch.cat([layer.B, layer.B[:1]], 0))


@pytest.fixture
def registry_with_corrections():
    class Plugin:
        @lowrank.hookimpl
        def lowrank_register_corrections(self, register):
            register(Probe)
            register(Grow)

    pm = new_manager()
    pm.register(Plugin(), name="test-corrections")
    yield reset_registry(pm)
    reset_registry()


def test_a_correction_runs_once_per_block_and_reports(registry_with_corrections):
    Probe.calls.clear()
    model = build("llama")
    recipe = lowrank.Recipe.from_yaml("corrections: [test-refit]\nratio: 0.4\n")
    assert [c.name for c in recipe.corrections] == ["test-refit"]
    assert lowrank.Recipe.from_dict(recipe.to_dict()) == recipe
    report = lowrank.compress(model, recipe, calibration(), progress=False)
    assert Probe.calls == [0, 1, 2]
    assert sum("refit block" in n for n in report.notes) == 3
    assert "corrections" in report.timings


def test_a_correction_that_grows_a_rank_is_refused_and_the_model_restored(registry_with_corrections):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressionError, match="grew the rank"):
        lowrank.compress(model, lowrank.Recipe(corrections=["test-grow"]), calibration(), progress=False)
    assert not any(isinstance(m, lowrank.LowRankLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_unknown_correction_lists_the_kind():
    with pytest.raises(lowrank.RegistryError, match="unknown correction"):
        lowrank.Recipe(corrections=["nope"])


def test_defaults_come_from_the_registry():
    recipe = lowrank.Recipe()
    registry = lowrank.get_registry()
    assert type(recipe.scalings[0]) is registry.default("scaling")
    assert type(recipe.allocator) is registry.default("allocator")
    assert type(recipe.exporter) is registry.default("exporter")
    assert registry.default("correction") is None and recipe.corrections == []


def test_out_of_memory_names_the_block_and_restores_the_model(monkeypatch):
    from lowrank._engine.block_pass import BlockPass

    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = BlockPass.collect

    def collect(self, block, index, inputs, keep_outputs, **kwargs):
        if index == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, block, index, inputs, keep_outputs, **kwargs)

    monkeypatch.setattr(BlockPass, "collect", collect)
    with pytest.raises(torch.OutOfMemoryError, match="block 2 of 3.*smaller batch_size"):
        lowrank.compress(model, lowrank.Recipe(), calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, lowrank.LowRankLinear) for m in model.modules())
