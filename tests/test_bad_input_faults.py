"""Faults lose nothing: a write that fails half-way leaves no output directory and the model as it
was; Ctrl-C (KeyboardInterrupt) at any phase of a compression leaves the model usable, exactly as
it was, and nothing half-written.

Rows of docs/bad-input.md ("Faults"). Interrupts are injected through public seams only (module
hooks on the model, the strategies' methods, transformers' writer), so the tests do not depend on
the engine's internals.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from bad_input_kit import cli, save_plain, snapshot, text_file, unchanged
from tiny_models import build, calibration

import lowrank

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

PROBE = torch.arange(24).reshape(2, 12) % 128


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


def _grad_state(model):
    return [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]


class _Trip:
    """Raises ``error`` on the ``at``-th call (counting from 1)."""

    def __init__(self, at: int, error: BaseException) -> None:
        self.at, self.error, self.calls = at, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error


def _hook(module, trip, pre=True):
    if pre:
        return module.register_forward_pre_hook(lambda m, a: trip())
    return module.register_forward_hook(lambda m, a, o: trip())


def _interrupt_compress(model, recipe, arm):
    """Run compress with an interrupt armed by ``arm(model)``; return the trip."""
    trip, handles = arm(model)
    try:
        with pytest.raises(KeyboardInterrupt):
            lowrank.compress(model, recipe, calibration(4, 16), batch_size=2, progress=False)
    finally:
        for h in handles:
            h.remove()
    return trip


def _arm_hook(path, at, pre=True):
    def arm(model):
        trip = _Trip(at, KeyboardInterrupt())
        return trip, [_hook(model.get_submodule(path), trip, pre)]
    return arm


def _arm_method(monkeypatch, cls, name, at):
    original = getattr(cls, name)
    trip = _Trip(at, KeyboardInterrupt())

    def wrapped(self, *args, **kwargs):
        trip()
        return original(self, *args, **kwargs)

    def arm(model):
        monkeypatch.setattr(cls, name, wrapped)
        return trip, []
    return arm


PHASES = {
    # phase: (recipe, how to arm, the least calls that must have happened)
    "capture": (dict(), lambda mp: _arm_hook("model.embed_tokens", 1, pre=False)),
    "statistics, block 0": (dict(), lambda mp: _arm_hook("model.layers.0.mlp", 1)),
    "statistics, block 1": (dict(), lambda mp: _arm_hook("model.layers.1.mlp", 1)),
    "next inputs, block 1": (dict(), lambda mp: _arm_hook("model.layers.1.mlp", 4)),
    "last block": (dict(), lambda mp: _arm_hook("model.layers.2.mlp", 2)),
    "gradients": (dict(scalings=["fwsvd"]), lambda mp: _arm_hook("lm_head", 1, pre=False)),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_ctrl_c_in_a_forward_phase_leaves_the_model_as_it_was(phase, monkeypatch):
    model = build("llama")
    before, logits, grads = snapshot(model), _logits(model), _grad_state(model)
    recipe_kw, arm = PHASES[phase]
    trip = _interrupt_compress(model, lowrank.Recipe(ratio=0.3, **recipe_kw), arm(monkeypatch))
    assert trip.calls >= trip.at
    assert unchanged(model, before) and torch.equal(_logits(model), logits)
    assert _grad_state(model) == grads and not model.training
    assert not hasattr(model, "lowrank_report") and not hasattr(model, "lowrank_recipe")
    report = lowrank.compress(model, lowrank.Recipe(ratio=0.3, **recipe_kw), calibration(4, 16), progress=False)
    assert report.ratio_achieved >= 0.3  # usable: it compresses as if nothing had happened


def _strategy_phases(monkeypatch):
    from lowrank_builtin.allocators import Energy, Uniform
    from lowrank_builtin.scalings import Whitening

    return {
        "factorization, block 1": (lowrank.Recipe(ratio=0.3), _arm_method(monkeypatch, Whitening, "fit", 8)),
        "allocation, block 2": (lowrank.Recipe(ratio=0.3), _arm_method(monkeypatch, Uniform, "allocate", 3)),
        "global planning": (lowrank.Recipe(ratio=0.3, allocator="energy"),
                            _arm_method(monkeypatch, Energy, "allocate", 1)),
        "correction, block 1": (lowrank.Recipe(ratio=0.3, corrections=[_InterruptingCorrection()]), None),
    }


class _InterruptingCorrection(lowrank.Correction):
    """Does nothing on block 0, is interrupted on block 1."""

    name = "interrupting"

    def correct(self, context) -> None:
        if context.index == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["factorization, block 1", "allocation, block 2", "global planning",
                                   "correction, block 1"])
def test_ctrl_c_in_a_strategy_leaves_the_model_as_it_was(phase, monkeypatch):
    model = build("llama")
    before, logits = snapshot(model), _logits(model)
    recipe, arm = _strategy_phases(monkeypatch)[phase]
    _interrupt_compress(model, recipe, arm or (lambda m: (None, [])))
    assert unchanged(model, before) and torch.equal(_logits(model), logits)
    monkeypatch.undo()
    lowrank.compress(model, lowrank.Recipe(ratio=0.3), calibration(4, 16), progress=False)


def _compressed():
    model = build("llama")
    lowrank.compress(model, lowrank.Recipe(ratio=0.3), calibration(4, 16), progress=False)
    return model


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("exporter", ["hf", "dense"])
@pytest.mark.parametrize("where", ["weights", "tokenizer", "report"])
@pytest.mark.parametrize("error", ["disk full", "ctrl-c"])
def test_a_write_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch, exporter, where, error):
    import transformers.modeling_utils

    from lowrank import CompressionReport

    model = _compressed()
    before, logits, config = snapshot(model), _logits(model), model.config.to_dict()
    fail = _disk_full if error == "disk full" else _Trip(1, KeyboardInterrupt())
    if where == "weights":
        real = transformers.modeling_utils.safe_save_file

        def half(tensors, filename, *args, **kwargs):  # write half a file, then fail
            real(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            fail()

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half)
    elif where == "report":
        monkeypatch.setattr(CompressionReport, "to_json", lambda self: fail())
    tokenizer = _FailingTokenizer(fail) if where == "tokenizer" else None
    with pytest.raises(KeyboardInterrupt if error == "ctrl-c" else OSError):
        lowrank.save(model, tmp_path / "out", tokenizer=tokenizer, exporter=exporter)
    assert os.listdir(tmp_path) == []  # no output directory, no hidden partial one
    assert unchanged(model, before) and torch.equal(_logits(model), logits)
    assert model.config.to_dict() == config
    monkeypatch.undo()
    lowrank.save(model, tmp_path / "out", exporter=exporter)  # and it saves once the disk is back
    reloaded = _logits(lowrank.load(tmp_path / "out"))
    if exporter == "hf":
        assert torch.equal(reloaded, logits)
    else:  # merged in float64, rounded once
        torch.testing.assert_close(reloaded, logits, atol=1e-4, rtol=0)


class _FailingTokenizer:
    def __init__(self, fail) -> None:
        self.fail = fail

    def save_pretrained(self, directory):
        (directory / "tokenizer.json").write_text("{")
        self.fail()


def test_cli_write_failure_exits_3_and_leaves_nothing(tmp_path, monkeypatch):
    import transformers.modeling_utils

    folder, text = save_plain(tmp_path / "plain"), text_file(tmp_path)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full)
    work = tmp_path / "work"
    work.mkdir()
    result = cli("compress", folder, "--calib", f"file:{text}", "--calib-windows", "2", "--seqlen", "32",
                 "--eval", "none", "--out", work / "out")
    assert result.exit_code == 3, result.output
    assert "Error: No space left on device; nothing was written" in result.stderr
    assert os.listdir(work) == []
