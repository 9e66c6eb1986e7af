"""The statistics hooks' Gram update: the upper-triangle panels equal the full product."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank._engine.stats import GRAM_PANEL, StatsCollector, add_gram, symmetrized


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([7, 4 * GRAM_PANEL - 1, 4 * GRAM_PANEL, 4 * GRAM_PANEL + 37]),
       tokens=st.integers(1, 40), batches=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_panel_gram_equals_full_product(n, tokens, batches, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, n, generator=g) for _ in range(batches)]
    gram = torch.zeros(n, n)
    for x in xs:
        add_gram(gram, x)
    full = sum(x.double().T @ x.double() for x in xs)
    got = symmetrized(gram.double(), n >= 4 * GRAM_PANEL)
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4 * tokens * batches)


def test_collector_gram_of_a_wide_layer_is_symmetric_and_exact():
    n = 4 * GRAM_PANEL + 5
    layer = torch.nn.Linear(n, 3)
    collector = StatsCollector()
    x = torch.randn(2, 9, n)
    with collector.attached({"down": layer}), torch.no_grad():
        layer(x)
    stats = collector.stats("down")
    flat = x.reshape(-1, n).double()
    torch.testing.assert_close(stats.gram, flat.T @ flat, rtol=1e-5, atol=1e-3)
    assert stats.n_tokens == 18
