"""Properties of the rank allocators: budget, bounds, monotonicity, determinism."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import lowrank
from lowrank import Budget, MatrixSpectrum, stored_params
from lowrank_builtin import Energy, Uniform

from .strategies import (
    DTYPE,
    RATIOS,
    decimal,
    matrix_spectra,
    single_threaded_torch,  # noqa: F401  (autouse fixture)
)

GLOBAL = {"uniform": lambda: Uniform(), "energy": lambda: Energy()}  # allocators that honour a budget

# 20 x 20 at ratio 0.9: 10% of 400 is exactly 40 parameters = one rank-1 factor pair.
FLAT_20 = [MatrixSpectrum("w", (20, 20), torch.ones(20, dtype=DTYPE))]


def budget_for(spectra, ratio: float) -> Budget:
    return Budget(ratio, sum(s.dense_params for s in spectra))


def ranks(selections) -> list[int]:
    return [sel.rank for sel in selections]


def total_params(spectra, selections) -> int:
    return sum(sel.params(s.shape) for s, sel in zip(spectra, selections))


def exact_uniform_rank(m: int, n: int, ratio: Fraction) -> int:
    return min(math.floor(m * n * (1 - ratio) / (m + n)), min(m, n))


def check_selections(spectra, selections):
    assert len(selections) == len(spectra)
    for s, sel in zip(spectra, selections):
        assert sel.is_prefix and sel.rescale is None
        assert 0 <= sel.rank <= min(s.shape), (s.shape, sel.rank)


@given(spectra=matrix_spectra(), ratio=RATIOS)
@example(spectra=FLAT_20, ratio=0.9)
def test_uniform_is_the_formula_and_removes_at_least_the_ratio(spectra, ratio):
    """k = floor(m n (1 - r) / (m + n)) with r the decimal the user wrote; what is stored is at most
    m n (1 - r) for every matrix (so at least the ratio is removed)."""
    uniform = Uniform()
    selections = uniform.allocate(spectra, budget_for(spectra, ratio))
    check_selections(spectra, selections)
    r = decimal(ratio)
    for s, sel in zip(spectra, selections):
        m, n = s.shape
        exact = exact_uniform_rank(m, n, r)
        x = m * n * (1 - r) / (m + n)
        # uniform_rank documents a 1e-9 guard against round-off just below an integer: within it,
        # one more rank is accepted (only reachable with ratios a hair above a breakpoint).
        guarded = sel.rank == exact + 1 and math.ceil(x) - x <= Fraction(1, 10**9)
        assert sel.rank == exact or guarded, (s.shape, ratio, sel.rank, exact)
        assert uniform.rank_hint(s.shape, ratio) == sel.rank
        slack = Fraction(m + n, 10**9) if guarded else 0
        assert stored_params(m, n, sel.rank) <= m * n * (1 - r) + slack


@given(dense=st.integers(1, 10**9), ratio=RATIOS)
@example(dense=400, ratio=0.9)
def test_budget_allowed_params_is_the_floor_of_what_the_ratio_keeps(dense, ratio):
    """allowed_params = floor(dense (1 - r)) with r the decimal ratio, as uniform_rank computes it."""
    keep = dense * (1 - decimal(ratio))
    allowed = Budget(ratio, dense).allowed_params
    # A round-off guard as in uniform_rank (a hair, 1e-9 relative, above the exact value) is fine.
    assert math.floor(keep) <= allowed <= math.floor(keep + max(keep, 1) * Fraction(1, 10**9)), (
        allowed, keep)


@pytest.mark.parametrize("name", list(GLOBAL))
@given(spectra=matrix_spectra(), ratio=RATIOS)
@example(spectra=FLAT_20, ratio=0.9)
def test_allocations_never_exceed_the_budget(name, spectra, ratio):
    budget = budget_for(spectra, ratio)
    selections = GLOBAL[name]().allocate(spectra, budget)
    check_selections(spectra, selections)
    assert total_params(spectra, selections) <= budget.allowed_params, (
        ranks(selections), total_params(spectra, selections), budget.allowed_params)


@pytest.mark.parametrize("name", list(GLOBAL))
@given(spectra=matrix_spectra(), r1=RATIOS, r2=RATIOS)
def test_a_larger_ratio_never_raises_a_rank(name, spectra, r1, r2):
    lo, hi = sorted((r1, r2))
    allocator = GLOBAL[name]()
    keep_more = allocator.allocate(spectra, budget_for(spectra, lo))
    keep_less = allocator.allocate(spectra, budget_for(spectra, hi))
    for s, a, b in zip(spectra, keep_more, keep_less):
        assert b.rank <= a.rank, (s.shape, lo, hi, a.rank, b.rank)
    assert total_params(spectra, keep_less) <= total_params(spectra, keep_more)


@pytest.mark.parametrize("name", list(GLOBAL))
@given(spectra=matrix_spectra(), ratio=RATIOS, data=st.data())
def test_allocators_are_deterministic_and_permutation_equivariant(name, spectra, ratio, data):
    budget = budget_for(spectra, ratio)
    first = GLOBAL[name]().allocate(spectra, budget)
    assert GLOBAL[name]().allocate(spectra, budget) == first
    assert GLOBAL[name]().allocate(list(spectra), budget) == first
    perm = data.draw(st.permutations(range(len(spectra))))
    permuted = GLOBAL[name]().allocate([spectra[i] for i in perm], budget)
    assert permuted == [first[i] for i in perm]


@given(spectra=matrix_spectra(), ratio=RATIOS)
def test_global_energy_gives_up_only_when_rank_one_everywhere_does_not_fit(spectra, ratio):
    energy = Energy()
    assert energy.scope == "global"
    budget = budget_for(spectra, ratio)
    got = ranks(energy.allocate(spectra, budget))
    rank_one = sum(stored_params(*s.shape, 1) for s in spectra)
    if rank_one <= budget.allowed_params:
        assert all(k >= 1 for k in got), got
    else:
        assert got == [0] * len(spectra)
    if sum(s.dense_params for s in spectra) <= budget.allowed_params:  # ratio 0: keep everything
        for s, k in zip(spectra, got):
            energy_kept = float(s.singular_values[:k].pow(2).sum())
            total = float(s.singular_values.pow(2).sum())
            assert energy_kept >= total * (1 - 1e-9)


def kept_fraction(s: torch.Tensor, k: int) -> float:
    total = float(s.pow(2).sum())
    return float(s[:k].pow(2).sum()) / total if total > 0 else 1.0


@given(spectra=matrix_spectra(), f1=st.floats(1e-6, 1.0), f2=st.floats(1e-6, 1.0))
def test_energy_with_a_fraction_keeps_the_smallest_rank_holding_it(spectra, f1, f2):
    lo, hi = sorted((f1, f2))
    a, b = Energy(fraction=lo), Energy(fraction=hi)
    assert a.scope == "matrix"
    budget = budget_for(spectra, 0.5)  # ignored when the fraction is set
    small, large = a.allocate(spectra, budget), b.allocate(spectra, budget)
    check_selections(spectra, small)
    check_selections(spectra, large)
    for s, sel_lo, sel_hi in zip(spectra, small, large):
        sv = s.singular_values
        assert sel_lo.rank <= sel_hi.rank
        for f, k in ((lo, sel_lo.rank), (hi, sel_hi.rank)):
            if float(sv.pow(2).sum()) == 0:
                assert k == 0
                continue
            assert kept_fraction(sv, k) >= f - 1e-9, (f, k)
            assert k == 0 or kept_fraction(sv, k - 1) < f + 1e-9, (f, k)


def test_allocators_are_registered():
    registry = lowrank.get_registry()
    assert registry.get("allocator", "uniform") is Uniform
    assert registry.get("allocator", "energy") is Energy
