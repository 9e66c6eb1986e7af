"""The loss-aware allocator (SVD-LLM V2's heterogeneous ratios)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build, calibration

import lowrank
from lowrank import (
    Budget,
    LayerStats,
    MatrixSpectrum,
    Selection,
    build_factors,
    floor_tolerant,
    scaled_svd,
    stored_params,
    uniform_rank,
)
from lowrank_builtin import Whitening
from lowrank_builtin.loss_aware import LossAware, group_ranks, matrix_type, truncation_losses

D = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name,block,expected", [
    ("model.layers.3.self_attn.q_proj", 3, "self_attn.q_proj"),
    ("model.layers.12.mlp.down_proj", 12, "mlp.down_proj"),
    ("transformer.h.0.attn.c_proj", 0, "attn.c_proj"),
    ("transformer.h.0.mlp.c_proj", 0, "mlp.c_proj"),
    ("model.language_model.layers.1.mlp.gate_proj", None, "mlp.gate_proj"),
])
def test_matrix_type_is_the_name_inside_the_block(name, block, expected):
    assert matrix_type(name, block) == expected


def test_the_loss_is_the_activation_norm_error_under_whitening():
    """sqrt(dropped sigma^2 of the whitened spectrum) = ||(W - W_k) X||_F / sqrt(T)."""
    g = torch.Generator().manual_seed(0)
    m, n, t = 14, 10, 50
    w = torch.randn(m, n, generator=g, dtype=D)
    x = torch.randn(n, t, generator=g, dtype=D) * torch.linspace(0.1, 2.0, n, dtype=D)[:, None]
    svd = scaled_svd(w, LayerStats(x @ x.T, t), [Whitening()])
    ratio = 0.4
    k = uniform_rank((m, n), ratio)
    a, b = build_factors(svd, Selection.prefix(k))
    direct = float(torch.linalg.norm((w - a @ b) @ x))
    spectrum = MatrixSpectrum("model.layers.0.mlp.up_proj", (m, n), svd.s)
    assert truncation_losses([spectrum], ratio, tokens=t)[0] == pytest.approx(direct, rel=1e-6)
    assert truncation_losses([spectrum], ratio)[0] == pytest.approx(direct / math.sqrt(t), rel=1e-6)


@settings(max_examples=40)
@given(count=st.integers(1, 8), shape=st.tuples(st.integers(2, 40), st.integers(2, 40)),
       weights=st.lists(st.floats(0.05, 10.0), min_size=8, max_size=8), ratio=st.floats(0.05, 0.9))
def test_every_group_meets_the_ratio_within_one_component(count, shape, weights, ratio):
    shapes = [shape] * count
    w = weights[:count]
    ranks = group_ranks(shapes, w, ratio)
    dense = count * shape[0] * shape[1]
    allowed = floor_tolerant(dense * (1 - ratio))
    stored = sum(stored_params(*sh, k) for sh, k in zip(shapes, ranks))
    assert stored <= allowed
    assert allowed - stored < sum(shape)   # no further component fits
    # a larger weight (smaller loss) gives up at least as much, up to the one-component fill-up
    for i in range(count):
        for j in range(count):
            if w[i] > w[j] * 1.05:
                assert ranks[i] <= ranks[j] + 1, (w, ranks)


def test_mixed_shapes_in_a_group():
    shapes = [(30, 20), (20, 30), (16, 16), (40, 12)]
    ranks = group_ranks(shapes, [1.0, 2.0, 0.5, 1.0], 0.3)
    dense = sum(m * n for m, n in shapes)
    stored = sum(stored_params(*sh, k) for sh, k in zip(shapes, ranks))
    assert floor_tolerant(dense * 0.7) - max(sum(s) for s in shapes) < stored <= floor_tolerant(dense * 0.7)


def _spectra(losses_scale: float):
    """Two types x three blocks with geometric spectra; block 1 has the flattest (largest loss)."""
    out = []
    for block in range(3):
        for local, shape in (("self_attn.q_proj", (24, 24)), ("mlp.down_proj", (24, 48))):
            decay = 0.6 if block != 1 else 0.95
            s = losses_scale * decay ** torch.arange(min(shape), dtype=D)
            out.append(MatrixSpectrum(f"model.layers.{block}.{local}", shape, s, block=block))
    return out


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("loss_scale", ["total", "relative"])
def test_larger_loss_gets_a_smaller_cut_and_groups_meet_the_ratio(scale, loss_scale):
    spectra = _spectra(scale)
    allocator = LossAware(loss_scale=loss_scale)
    allocator._tokens = 4096
    budget = Budget(0.4, sum(s.dense_params for s in spectra))
    sels = allocator.allocate(spectra, budget)
    weights = allocator.weights(spectra, 0.4)
    assert all(math.isfinite(x) and x > 0 for x in weights)   # L <= 1 (scale 1e-3) included
    by_type: dict[str, list[tuple[MatrixSpectrum, Selection]]] = {}
    for s, sel in zip(spectra, sels):
        by_type.setdefault(matrix_type(s.name, s.block), []).append((s, sel))
    for group in by_type.values():
        dense = sum(s.dense_params for s, _ in group)
        stored = sum(sel.params(s.shape) for s, sel in group)
        assert floor_tolerant(dense * 0.6) - max(sum(s.shape) for s, _ in group) < stored <= floor_tolerant(dense * 0.6)
        ranks = {s.block: (s.shape[0] * s.shape[1] if sel.is_dense else sel.rank) for s, sel in group}
        if loss_scale == "total" and scale < 1:
            # every L_i <= e^min_log: the paper's 1/log(L) has no information left, all weights are
            # equal and the allocation is uniform up to the one-component fill-up (see the docs)
            assert len(set(weights)) == 1 and max(ranks.values()) - min(ranks.values()) <= 1
        else:
            assert ranks[1] > ranks[0] and ranks[1] > ranks[2]


def test_compress_tiny_models_lands_on_the_ratio():
    for arch in ("llama", "gpt2"):
        model = build(arch)
        report = lowrank.compress(model, lowrank.Recipe(allocator="loss-aware", ratio=0.3), calibration(), progress=False)
        removed = report.target_params_before - report.target_params_after
        groups = len({matrix_type(m.name, m.block) for m in report.matrices})
        assert 0.3 * report.target_params_before <= removed
        assert removed - 0.3 * report.target_params_before < groups * max(sum(m.shape) for m in report.matrices)
        assert torch.isfinite(model(calibration(1, 16)).logits).all()
