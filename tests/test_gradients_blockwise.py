"""The block-by-block gradient pass (what a streamed run uses) gives the whole-model gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calibration

import lowrank
from lowrank._engine.gradients import gradient_pass
from lowrank._engine.gradients_blockwise import blockwise_gradient_pass
from lowrank._engine.setup import RunSetup


def _collect(store: dict[str, list[torch.Tensor]]):
    def probe(name: str, grad: torch.Tensor) -> None:
        store.setdefault(name, []).append(grad.clone())
    return probe


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_blockwise_gradients_equal_the_whole_model_pass(arch):
    model = build(arch)
    if arch == "gemma3":  # logit soft-capping goes through the model's own head
        model.config.final_logit_softcapping = 5.0
    windows = calibration(3, 16, seed=1)
    setup = RunSetup.create(model, lowrank.Recipe(ratio=0.3), calibration(), 4, False, None)
    whole: dict[str, list[torch.Tensor]] = {}
    plain = gradient_pass(model, windows, setup.modules(), _collect(whole))
    blockwise: dict[str, list[torch.Tensor]] = {}
    info = blockwise_gradient_pass(setup, windows, _collect(blockwise))
    assert sorted(blockwise) == sorted(whole) and len(whole) == len(setup.targets)
    for name, grads in whole.items():
        assert len(blockwise[name]) == len(grads) == 3
        for a, b in zip(grads, blockwise[name]):
            assert a.abs().max() > 0
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert info.loss == pytest.approx(plain.loss, rel=1e-5)
    assert info.batches == plain.batches and info.tokens == plain.tokens
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
