"""FWSVD: the Fisher-weighted left scaling."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calibration

import lowrank
from lowrank import LayerStats, Selection, build_factors, scaled_svd
from lowrank_builtin import Whitening
from lowrank_builtin.fwsvd import FWSVD

D = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def problem(m=12, n=9, seed=0, dead_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=D)
    x = torch.randn(n, 3 * n, generator=g, dtype=D)
    fisher = torch.rand(m, generator=g, dtype=D) * 10.0 ** torch.linspace(-2, 2, m, dtype=D)
    fisher[list(dead_rows)] = 0.0
    return w, LayerStats(x @ x.T, 3 * n, grad_row_sq=fisher)


@pytest.mark.parametrize("dead_rows", [(), (0, 5)])
@pytest.mark.parametrize("stack", ["fwsvd", "fwsvd+whitening"])
@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
def test_round_trip_at_full_rank(dead_rows, stack, shape):
    w, stats = problem(*shape, dead_rows=dead_rows)
    scalings = [FWSVD()] + ([Whitening()] if stack == "fwsvd+whitening" else [])
    svd = scaled_svd(w, stats, scalings)
    a, b = build_factors(svd, Selection.prefix(min(shape)))
    torch.testing.assert_close(a @ b, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))
    assert (any("floored" in n for n in svd.notes)) == bool(dead_rows)


def test_left_scale_is_the_root_fisher_with_a_floor():
    w, stats = problem(dead_rows=(3,))
    t = FWSVD(floor=1e-2).fit(w, stats)
    root = stats.grad_row_sq.sqrt()
    expected = root.clamp_min(1e-2 * float(root.max()))
    torch.testing.assert_close(t.left.d, expected)
    assert t.right is None


def test_truncation_minimises_the_fisher_weighted_error():
    """The rank-k FWSVD truncation is optimal in ||diag(sqrt(I)) (W - W')||_F: no worse than plain SVD."""
    w, stats = problem(m=20, n=14, seed=2)
    d = stats.grad_row_sq.sqrt()
    for k in (1, 4, 9):
        a, b = build_factors(scaled_svd(w, stats, [FWSVD(floor=1e-9)]), Selection.prefix(k))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        plain = (u[:, :k] * s[:k]) @ vh[:k]
        weighted = float(torch.linalg.norm(d[:, None] * (w - a @ b)))
        assert weighted <= float(torch.linalg.norm(d[:, None] * (w - plain))) * (1 + 1e-9)


def test_zero_fisher_everywhere_is_the_identity():
    w, stats = problem()
    stats.grad_row_sq = torch.zeros(w.shape[0], dtype=D)
    t = FWSVD().fit(w, stats)
    assert t.left is None and t.right is None and t.notes


def test_pipeline_collects_the_row_fisher():
    for arch in ("llama", "gpt2"):
        model = build(arch)
        recipe = lowrank.Recipe(scalings=["fwsvd", "whitening"], ratio=0.3)
        report = lowrank.compress(model, recipe, calibration(4, 16), progress=False)
        assert any(n.startswith("gradient pass (statistics, lean): 4 batch(es)") for n in report.notes)
        assert report.ratio_achieved >= 0.3
        assert torch.isfinite(model(calibration(1, 16)).logits).all()
