"""Properties of the zero-sum selection: it is the published greedy rule, and it counts parameters exactly.

The reference below simulates the rule naively with lists (no heaps, no incremental totals): at
every step it lists each matrix's current smallest remaining component, splits the candidates by
the sign of their predicted change, takes the smallest |dL| (ties: lowest matrix index) from the
dL >= 0 side while the running sum is <= 0 and from the dL < 0 side otherwise (the other side when
one is empty), and recomputes every stored-parameter count from scratch.
"""

from __future__ import annotations

import math

import torch
from hypothesis import example, given
from hypothesis import strategies as st

import lowrank
from lowrank import Budget, MatrixSpectrum, breakeven_rank, stored_params
from lowrank_builtin.zero_sum import ZeroSum, component_floor, zero_sum_ranks

from .strategies import (
    DTYPE,
    SEEDS,
    generator,
    single_threaded_torch,  # noqa: F401  (autouse fixture)
)


def naive_stored(m: int, n: int, k: int) -> int:
    """Dense until the factors are strictly smaller than the matrix."""
    return k * (m + n) if k * (m + n) < m * n else m * n


def reference(shapes, scores, allowed, floors):
    ranks = [min(s) for s in shapes]
    running = 0.0
    while sum(naive_stored(*sh, k) for sh, k in zip(shapes, ranks)) > allowed:
        candidates = [(abs(scores[j][ranks[j] - 1]), j, scores[j][ranks[j] - 1])
                      for j in range(len(shapes)) if ranks[j] > floors[j]]
        if not candidates:
            break
        nonneg = [c for c in candidates if c[2] >= 0]
        neg = [c for c in candidates if c[2] < 0]
        pool = (nonneg or neg) if running <= 0 else (neg or nonneg)
        _, j, d = min(pool)
        ranks[j] -= 1
        running += d
    return ranks, running


@st.composite
def cases(draw, max_matrices: int = 5, max_dim: int = 12, ties: bool = False):
    count = draw(st.integers(1, max_matrices))
    g = generator(draw(SEEDS))
    shapes, scores = [], []
    for _ in range(count):
        m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
        r = min(m, n)
        if ties:   # few distinct values: ties in |dL|, zeros, equal magnitudes of both signs
            s = (torch.randint(-2, 3, (r,), generator=g).to(DTYPE) / 2).tolist()
        else:
            s = (torch.randn(r, generator=g, dtype=DTYPE) * 10.0 ** draw(st.floats(-3, 3))).tolist()
        shapes.append((m, n))
        scores.append(s)
    dense = sum(m * n for m, n in shapes)
    ratio = draw(st.floats(0.01, 0.95))
    keep = draw(st.sampled_from([0.0, 0.0, 0.3, 0.6]))
    return shapes, scores, Budget(ratio, dense), keep


@given(case=cases())
@example(case=([(4, 4), (3, 5)], [[0.1, -0.2, 0.3, -0.4], [0.5, 0.0, -0.1]], Budget(0.5, 31), 0.0))
def test_heap_selection_equals_the_naive_rule(case):
    shapes, scores, budget, keep = case
    floors = [component_floor(sh, keep) for sh in shapes]
    got = zero_sum_ranks(shapes, scores, budget.allowed_params, floors)
    want = reference(shapes, scores, budget.allowed_params, floors)
    assert got[0] == want[0]
    assert math.isclose(got[1], want[1], rel_tol=1e-9, abs_tol=1e-12)


@given(case=cases(ties=True))
def test_heap_selection_equals_the_naive_rule_with_ties(case):
    shapes, scores, budget, keep = case
    floors = [component_floor(sh, keep) for sh in shapes]
    assert zero_sum_ranks(shapes, scores, budget.allowed_params, floors)[0] == \
        reference(shapes, scores, budget.allowed_params, floors)[0]


@given(case=cases(max_matrices=7, max_dim=40))
def test_exact_parameter_accounting(case):
    """Total stored <= floor(dense (1 - r)), overshooting by less than one component's saving;
    matrices whose planned rank stays above r* are dense; every rank respects the floor."""
    shapes, scores, budget, keep = case
    spectra = [MatrixSpectrum(f"layers.{i}.proj", sh, torch.linspace(1, 0.1, min(sh), dtype=DTYPE),
                              torch.tensor(sc, dtype=DTYPE), block=i)
               for i, (sh, sc) in enumerate(zip(shapes, scores))]
    floors = [component_floor(sh, keep) for sh in shapes]
    planned, _ = zero_sum_ranks(shapes, scores, budget.allowed_params, floors)
    feasible = sum(stored_params(*sh, max(f, 0) if f <= breakeven_rank(*sh) else None)
                   for sh, f in zip(shapes, floors)) <= budget.allowed_params
    allocator = ZeroSum(keep_rank_ratio=keep)
    if not feasible:
        try:
            allocator.allocate(spectra, budget)
        except lowrank.CompressionError:
            return
        raise AssertionError("an infeasible floor must be an error")
    selections = allocator.allocate(spectra, budget)
    total = 0
    for sh, sel, k, f in zip(shapes, selections, planned, floors):
        m, n = sh
        r_star = (m * n - 1) // (m + n)
        if k > r_star:
            assert sel.is_dense
        else:
            assert sel.is_prefix and sel.rank == k and sel.params(sh) == k * (m + n) < m * n
            assert k >= f
        total += sel.params(sh)
    assert total <= budget.allowed_params
    # Within one component's saving: before the last step the budget was not met.
    assert budget.allowed_params - total < max(m + n for m, n in shapes)
    dense = budget.dense_params
    assert dense - total >= budget.ratio * dense - 1e-6 * dense


@given(seed=SEEDS, ratio=st.floats(0.05, 0.45))  # the other two alone can give up 53%
def test_a_matrix_with_expensive_components_stays_dense(seed, ratio):
    """Components with a huge predicted change are never taken while cheap ones remain."""
    g = generator(seed)
    shapes = [(16, 24), (20, 20), (8, 30)]
    scores = [torch.randn(min(sh), generator=g, dtype=DTYPE) * 1e-3 for sh in shapes]
    scores[1] = torch.full((20,), 1e6, dtype=DTYPE)
    spectra = [MatrixSpectrum(f"b.{i}", sh, torch.ones(min(sh), dtype=DTYPE), sc) for i, (sh, sc) in enumerate(zip(shapes, scores))]
    budget = Budget(ratio, sum(m * n for m, n in shapes))
    selections = ZeroSum().allocate(spectra, budget)
    assert selections[1].is_dense
    assert sum(s.params(sh) for s, sh in zip(selections, shapes)) <= budget.allowed_params
