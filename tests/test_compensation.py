"""The compensated target (``target: compensated``): fit the original output on shifted inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build, calibration

import lowrank
from lowrank import RecipeError
from lowrank._engine.compensation import compensated_weight

pytestmark = pytest.mark.usefixtures("single_thread")


def _whitened_truncation(w: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """The rank-k W' minimising ||(W - W') X~|| (SVD-LLM's whitening with the Gram of X~)."""
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(w @ factor, full_matrices=False)
    return (u[:, :k] * s[:k]) @ torch.linalg.solve_triangular(factor, vh[:k], upper=False, left=False)


@settings(max_examples=20, deadline=None)
@given(out=st.integers(3, 12), n=st.integers(3, 12), tokens=st.integers(40, 80), shift=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**16), data=st.data())
def test_compensated_truncation_is_closer_to_the_original_output(out, n, tokens, shift, seed, data):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, tokens, generator=g, dtype=torch.float64)
    shifted = x + shift * torch.randn(n, n, generator=g, dtype=torch.float64) @ x / n ** 0.5 \
        + shift * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    k = data.draw(st.integers(1, min(out, n)))
    gram = shifted @ shifted.T
    target, note = compensated_weight(w, x @ shifted.T, gram)
    assert note is None
    plain = _whitened_truncation(w, gram, k)
    compensated = _whitened_truncation(target, gram, k)
    error = lambda approx: float(torch.linalg.norm(w @ x - approx @ shifted))  # noqa: E731
    assert error(compensated) <= error(plain) * (1 + 1e-6) + 1e-9


def test_no_shift_means_no_change():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, 50, generator=g, dtype=torch.float64)
    target, _ = compensated_weight(w, x @ x.T, x @ x.T)
    torch.testing.assert_close(target, w, rtol=1e-3, atol=1e-3)   # up to the ridge


def test_a_singular_gram_gets_a_ridge_not_a_crash():
    w, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)   # rank 3 < 6
    target, _ = compensated_weight(w, x @ x.T, x @ x.T)
    assert torch.isfinite(target).all()


def _output_error(model, reference, windows) -> float:
    with torch.no_grad():
        return float((model(windows).logits - reference(windows).logits).pow(2).mean())


def test_compensated_beats_plain_on_a_tiny_model_with_shifted_inputs():
    """At a high ratio every block shifts the next one's inputs; compensating lowers the final error
    (on held-out windows too, given more calibration tokens than the 160 features of the MLP)."""
    original = build("llama")
    windows = calibration(64, 32)
    held_out = calibration(8, 32, seed=1)
    errors = {}
    for target in ("plain", "compensated"):
        model = copy.deepcopy(original)
        report = lowrank.compress(model, lowrank.Recipe(ratio=0.6, target=target), windows, progress=False)
        errors[target] = _output_error(model, original, held_out)
        errors[target + " calibration"] = _output_error(model, original, windows)
        if target == "compensated":
            assert report.timings.get("forward_reference", 0) > 0
    assert errors["compensated"] < errors["plain"]
    assert errors["compensated calibration"] < errors["plain calibration"]


def test_compensated_needs_sequential_inputs():
    with pytest.raises(RecipeError, match="needs inputs: sequential"):
        lowrank.Recipe(target="compensated", inputs="original")
    assert lowrank.Recipe.from_yaml("target: compensated\n").target == "compensated"
    with pytest.raises(RecipeError, match="target: expected one of plain, compensated"):
        lowrank.Recipe(target="anchored")
