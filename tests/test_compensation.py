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
from lowrank._engine.compensation import STRENGTHS, compensated_target

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
    result = compensated_target(w, x @ shifted.T, gram)
    assert result.note is None and result.strength == 1.0
    target = result.weight
    plain = _whitened_truncation(w, gram, k)
    compensated = _whitened_truncation(target, gram, k)
    error = lambda approx: float(torch.linalg.norm(w @ x - approx @ shifted))  # noqa: E731
    assert error(compensated) <= error(plain) * (1 + 1e-6) + 1e-9


def test_no_shift_means_no_change():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, 50, generator=g, dtype=torch.float64)
    target = compensated_target(w, x @ x.T, x @ x.T).weight
    torch.testing.assert_close(target, w, rtol=1e-3, atol=1e-3)   # up to the ridge


def test_a_singular_gram_gets_a_ridge_not_a_crash():
    w, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)   # rank 3 < 6
    target = compensated_target(w, x @ x.T, x @ x.T).weight
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


def _shifted_problem(seed: int, out: int = 6, n: int = 8, tokens: int = 400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, tokens, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)[:, None]
    shifted = x + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) @ x / n ** 0.5
    return w, x, shifted


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.floats(0.1, 20.0))
def test_a_strength_is_the_minimiser_of_saes_weighted_objective(seed, beta):
    """CEALC: ||W X~ - W' X~||^2 + beta ||W X - W' X~||^2 is minimised by W + alpha D, alpha = beta / (1 + beta)."""
    w, x, shifted = _shifted_problem(seed)
    gram = shifted @ shifted.T
    alpha = beta / (1 + beta)
    target = compensated_target(w, x @ shifted.T, gram, strength=alpha).weight
    rhs = w @ shifted @ shifted.T + beta * w @ x @ shifted.T          # normal equations of the objective
    exact = torch.linalg.solve(gram, rhs.T).T / (1 + beta)

    def objective(v: torch.Tensor) -> float:
        return float((w @ shifted - v @ shifted).pow(2).sum() + beta * (w @ x - v @ shifted).pow(2).sum())

    assert objective(target) <= objective(exact) * (1 + 2e-3)   # optimal up to the ridge (<= 5e-4 over 900 draws)
    assert objective(target) < objective(w)   # the plain target is not the minimiser once beta > 0


def test_strength_zero_is_the_plain_target():
    w, x, shifted = _shifted_problem(0)
    assert torch.equal(compensated_target(w, x @ shifted.T, shifted @ shifted.T, strength=0.0).weight, w)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_adaptive_strength_keeps_the_largest_share_of_the_target_energy(rank):
    """ACES: checked against a brute-force SVD of every candidate's whitened target."""
    w, x, shifted = _shifted_problem(1)
    gram = shifted @ shifted.T
    chosen = compensated_target(w, x @ shifted.T, gram, strength=None, rank=rank)
    assert chosen.strength in STRENGTHS
    factor = torch.linalg.cholesky(gram)

    def share(alpha: float) -> float:
        s = torch.linalg.svdvals(compensated_target(w, x @ shifted.T, gram, strength=alpha).weight @ factor)
        return float(s[:rank].pow(2).sum() / s.pow(2).sum())

    best = max(share(a) for a in STRENGTHS)
    assert share(chosen.strength) >= best * (1 - 1e-9)
    torch.testing.assert_close(chosen.weight, compensated_target(w, x @ shifted.T, gram, strength=chosen.strength).weight)


def test_adaptive_needs_a_rank():
    w, x, shifted = _shifted_problem(2)
    with pytest.raises(ValueError, match="rank"):
        compensated_target(w, x @ shifted.T, shifted @ shifted.T, strength=None)


def test_the_default_strength_is_a_quarter():
    assert lowrank.Recipe(target="compensated").compensation == 0.25
    assert lowrank.Recipe().compensation == 0.25   # kept (and written) with the plain target, unused


def test_adaptive_strengths_reach_the_report():
    model = build("llama")
    recipe = lowrank.Recipe(ratio=0.6, target="compensated", compensation="adaptive")
    report = lowrank.compress(model, recipe, calibration(16, 32), progress=False)
    # block 0 sees the original inputs (nothing upstream is compressed): no shift, nothing to choose
    strengths = {m.name: m.diagnostics.get("compensation_strength") for m in report.matrices}
    assert all(s is None for name, s in strengths.items() if ".layers.0." in name)
    later = [s for name, s in strengths.items() if ".layers.0." not in name]
    assert later and all(s in STRENGTHS for s in later)
    plain = lowrank.compress(build("llama"), lowrank.Recipe(ratio=0.6), calibration(16, 32), progress=False)
    assert all("compensation_strength" not in m.diagnostics for m in plain.matrices)


def test_compensation_settings_are_validated():
    for bad in (1.5, -0.1, "full", True, float("nan")):
        with pytest.raises(RecipeError, match="compensation: expected adaptive or a number from 0"):
            lowrank.Recipe(target="compensated", compensation=bad)
    for useless in (0.5, "adaptive"):
        with pytest.raises(RecipeError, match="with target: plain it would do nothing"):
            lowrank.Recipe(compensation=useless)
    recipe = lowrank.Recipe.from_yaml("target: compensated\ncompensation: 0.25\n")
    assert recipe.compensation == 0.25
    assert lowrank.Recipe.from_yaml(recipe.to_yaml()).compensation == 0.25
    assert lowrank.Recipe.from_yaml("target: compensated\ncompensation: 1\n").compensation == 1.0
