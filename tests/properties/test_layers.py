"""Properties of ``LowRankLinear`` and of the dense-fallback parameter count."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank import LowRankLinear, breakeven_rank, factored_params, stored_params

from .strategies import (
    DTYPE,
    SEEDS,
    generator,
    single_threaded_torch,  # noqa: F401  (autouse fixture)
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@st.composite
def layers(draw, dtypes=tuple(DTYPES)):
    """(layer, A, B, bias) with float64 masters A, B, bias and the layer built in ``dtype``."""
    out_f = draw(st.integers(1, 48))
    in_f = draw(st.integers(1, 48))
    rank = draw(st.integers(0, min(out_f, in_f)))
    with_bias = draw(st.booleans())
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    g = generator(draw(SEEDS))
    scale = 10.0 ** draw(st.floats(-2, 2))
    a = torch.randn(out_f, rank, generator=g, dtype=DTYPE) * scale
    b = torch.randn(rank, in_f, generator=g, dtype=DTYPE)
    bias = torch.randn(out_f, generator=g, dtype=DTYPE) if with_bias else None
    layer = LowRankLinear.from_factors(a.to(dtype), b.to(dtype), None if bias is None else bias.to(dtype))
    return layer, a, b, bias


def inputs(layer: LowRankLinear, seed: int, lead: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*lead, layer.in_features, generator=generator(seed), dtype=DTYPE)


LEADING = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@given(spec=layers(), seed=SEEDS, lead=LEADING)
def test_forward_is_a_times_b_times_x_plus_bias(spec, seed, lead):
    """y = A (B x) + b against a float64 computation from the layer's own (rounded) parameters, with
    the standard forward-error bound |y - y_ref| <= c u (n + k + 2) (|A| |B| |x| + |b|)."""
    layer, _, _, _ = spec
    dtype = layer.A.dtype
    x64 = inputs(layer, seed, lead)
    a, b = layer.A.detach().double(), layer.B.detach().double()
    x = x64.to(dtype)
    xr = x.double()
    ref = (xr @ b.T) @ a.T
    magnitude = (xr.abs() @ b.abs().T) @ a.abs().T
    if layer.bias is not None:
        ref = ref + layer.bias.detach().double()
        magnitude = magnitude + layer.bias.detach().double().abs()
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*lead, layer.out_features)
    assert y.dtype == dtype
    u = torch.finfo(dtype).eps
    bound = 4 * u * (layer.in_features + layer.rank + 2) * magnitude
    assert (y.double() - ref).abs().le(bound).all(), float(((y.double() - ref).abs() - bound).max())


@given(spec=layers())
def test_from_factors_shapes_and_copies(spec):
    layer, a, b, bias = spec
    dtype = layer.A.dtype
    out_f, rank = a.shape
    in_f = b.shape[1]
    assert (layer.out_features, layer.in_features, layer.rank) == (out_f, in_f, rank)
    assert layer.A.shape == (out_f, rank) and layer.B.shape == (rank, in_f)
    assert layer.A.dtype == layer.B.dtype == dtype
    assert layer.A.is_contiguous() and layer.B.is_contiguous()
    assert torch.equal(layer.A.detach(), a.to(dtype)) and torch.equal(layer.B.detach(), b.to(dtype))
    if bias is None:
        assert layer.bias is None
        assert set(layer.state_dict()) == {"A", "B"}
    else:
        assert layer.bias.shape == (out_f,) and torch.equal(layer.bias.detach(), bias.to(dtype))
        assert set(layer.state_dict()) == {"A", "B", "bias"}
    assert sum(p.numel() for p in layer.parameters()) == rank * (out_f + in_f) + (out_f if bias is not None else 0)
    assert torch.equal(layer.weight.detach(), layer.A.detach() @ layer.B.detach())
    # from_factors copies: mutating the sources afterwards does not touch the layer
    before = layer.A.detach().clone()
    src = a.to(dtype)
    src.add_(1.0)
    assert torch.equal(layer.A.detach(), before)


@given(out_f=st.integers(1, 8), in_f=st.integers(1, 8), r1=st.integers(0, 4), r2=st.integers(0, 4))
def test_from_factors_rejects_factors_that_do_not_chain(out_f, in_f, r1, r2):
    a = torch.zeros(out_f, r1, dtype=DTYPE)
    b = torch.zeros(r2, in_f, dtype=DTYPE)
    if r1 == r2:
        assert LowRankLinear.from_factors(a, b).rank == r1
    else:
        with pytest.raises(ValueError):
            LowRankLinear.from_factors(a, b)


@given(out_f=st.integers(1, 32), in_f=st.integers(1, 32), data=st.data(), bias=st.booleans())
def test_constructor_shapes(out_f, in_f, data, bias):
    rank = data.draw(st.integers(0, min(out_f, in_f)))
    torch.manual_seed(0)  # nn.init draws from the global generator; keep runs reproducible
    layer = LowRankLinear(in_f, out_f, rank, bias=bias, dtype=DTYPE)
    assert layer.A.shape == (out_f, rank) and layer.B.shape == (rank, in_f)
    assert (layer.bias is not None) == bias
    assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all()
    x = torch.zeros(3, in_f, dtype=DTYPE)
    expected = layer.bias.detach().expand(3, out_f) if bias else torch.zeros(3, out_f, dtype=DTYPE)
    assert torch.equal(layer(x).detach(), expected)


@given(spec=layers(dtypes=("float32", "float64")), seed=SEEDS, lead=LEADING)
def test_safetensors_round_trip_is_bit_identical(spec, seed, lead):
    layer, _, _, _ = spec
    dtype = layer.A.dtype
    x = inputs(layer, seed, lead).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.safetensors")
        save_file(layer.state_dict(), path)
        loaded = load_file(path)
    fresh = LowRankLinear(layer.in_features, layer.out_features, layer.rank,
                         bias=layer.bias is not None, dtype=dtype)
    fresh.load_state_dict(loaded, strict=True)
    for name, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


# --------------------------------------------------------------------------------------------
# Dense fallback: factors are stored only when they are strictly smaller than the matrix


def test_breakeven_and_stored_params_exhaustively_on_small_shapes():
    for m in range(1, 33):
        for n in range(1, 33):
            brute = max(k for k in range(0, min(m, n) + 2) if k * (m + n) < m * n)
            assert breakeven_rank(m, n) == brute, (m, n)
            assert stored_params(m, n, None) == m * n
            for k in range(0, min(m, n) + 3):
                expected = m * n if k > brute else k * (m + n)
                assert stored_params(m, n, k) == expected, (m, n, k)
                assert factored_params(m, n, k) == k * (m + n)
                assert stored_params(m, n, k) <= m * n


@given(m=st.integers(1, 1 << 16), n=st.integers(1, 1 << 16))
def test_breakeven_rank_is_the_largest_rank_that_saves_parameters(m, n):
    k = breakeven_rank(m, n)
    assert 0 <= k < min(m, n)
    assert k * (m + n) < m * n
    assert (k + 1) * (m + n) >= m * n
    assert stored_params(m, n, k) == k * (m + n)
    assert stored_params(m, n, k + 1) == m * n
