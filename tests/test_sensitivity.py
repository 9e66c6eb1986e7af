"""ASVD's sensitivity allocator: the measurement leaves the model alone and is cached; the cut never
exceeds the budget and is the least compression that fits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build, calibration

import lowrank
from lowrank import Budget, MatrixSpectrum, stored_params
from lowrank_builtin.sensitivity import Sensitivity, cut_allocation, sensitivity_rank

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"candidates": (0.2, 0.5, 0.8), "windows": 2, "progress": False}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _params(fractions, shapes):
    return sum(stored_params(*shapes[n], None if p >= 1 else sensitivity_rank(shapes[n], p)) for n, p in fractions.items())


def test_cut_follows_asvd():
    """a is sensitive (high ppl when compressed), b is not: b is cut first, a stays dense."""
    shapes = {"a": (10, 10), "b": (10, 10)}
    entries = [("a", 0.2, 90.0), ("a", 0.5, 40.0), ("a", 0.8, 20.0),
               ("b", 0.2, 12.0), ("b", 0.5, 11.0), ("b", 0.8, 10.5)]
    # budget 150 of 200: a dense (100) + b at 0.5 (rank 2 = 40 params) is the least compression that fits
    chosen = cut_allocation(entries, shapes, 150)
    assert chosen == {"a": 1.0, "b": 0.5}
    chosen = cut_allocation(entries, shapes, 100)   # now a must be cut as well: its cheapest entry
    assert chosen == {"a": 0.8, "b": 0.2}
    assert cut_allocation(entries, shapes, 30) is None  # even both at 0.2 (40 params) do not fit


@given(data=st.data())
@settings(max_examples=40)
def test_cut_is_the_least_compression_within_budget(data):
    count = data.draw(st.integers(1, 4))
    shapes = {f"m{i}": (data.draw(st.integers(2, 30)), data.draw(st.integers(2, 30))) for i in range(count)}
    cands = data.draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), min_size=1, max_size=4, unique=True))
    entries = [(n, p, data.draw(st.floats(1.0, 1e4))) for n in shapes for p in cands]
    ratio = data.draw(st.floats(0.0, 0.95))
    dense = sum(m * n for m, n in shapes.values())
    allowed = math.floor(dense * (1 - ratio))
    chosen = cut_allocation(entries, shapes, allowed)
    ordered = sorted(entries, key=lambda e: -e[2])

    def fractions(cut):
        out = {n: 1.0 for n in shapes}
        for n, p, _ in ordered[cut:]:
            out[n] = min(out[n], p)
        return out

    fits = [c for c in range(len(ordered) + 1) if _params(fractions(c), shapes) <= allowed]
    if not fits:
        assert chosen is None
    else:
        assert chosen == fractions(max(fits))          # brute force: the largest cut that fits
        assert _params(chosen, shapes) <= allowed


def test_prepare_restores_the_model_and_caches(cache):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = lowrank.Recipe(scalings=["identity"], allocator={"sensitivity": FAST}, ratio=0.3)
    calib = calibration(4, 16)
    from lowrank import find_targets
    from lowrank._engine.contexts import EngineModelContext as ModelContext

    targets = find_targets(model, ["re:layers\\.0\\."], [])
    context = ModelContext(model, targets, calib, calib, torch.device("cpu"))
    alloc = recipe.allocator.prepare(context)
    assert recipe.allocator.table == {} and alloc is not recipe.allocator  # the recipe keeps its config only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert set(alloc.table) == {t.name for t in targets}
    assert all(set(row) == {0.2, 0.5, 0.8} for row in alloc.table.values())
    assert list((cache / "sensitivity").glob("*.json"))
    # a second allocator reads the table back instead of measuring
    again = Sensitivity(**FAST)
    again._measure = lambda *a: (_ for _ in ()).throw(AssertionError("measured again"))  # type: ignore[method-assign]
    context2 = ModelContext(model, targets, calib, calib, torch.device("cpu"))
    again = again.prepare(context2)
    assert again.table == alloc.table and any("cache" in n for n in context2.notes)
    # other calibration windows: another fingerprint
    other = Sensitivity(**FAST)
    other.prepare(ModelContext(model, targets, calibration(4, 16, seed=9), calib, torch.device("cpu")))
    assert len(list((cache / "sensitivity").glob("*.json"))) == 2


def test_compress_never_exceeds_the_budget():
    model = build("llama")
    report = lowrank.compress(model, lowrank.Recipe(scalings=["whitening"], allocator={"sensitivity": FAST},
                                                    ratio=0.4, targets=["re:layers\\.[01]\\."]),
                              calibration(4, 16), progress=False)
    assert report.ratio_achieved >= 0.4 - 1e-12
    assert torch.isfinite(model(calibration(1, 8)).logits).all()
    assert any("sensitivity" in n for n in report.notes)


def test_allocate_without_prepare_fails_clearly():
    spectra = [MatrixSpectrum("x", (4, 4), torch.ones(4, dtype=torch.float64))]
    with pytest.raises(lowrank.CompressionError, match="prepare"):
        Sensitivity().allocate(spectra, Budget(0.3, 16))


def test_budget_below_the_smallest_candidate_falls_back_to_uniform():
    alloc = Sensitivity(candidates=(0.5,))
    alloc.table = {"x": {0.5: 10.0}}
    spectra = [MatrixSpectrum("x", (20, 20), torch.ones(20, dtype=torch.float64))]
    with pytest.warns(UserWarning, match="uniform"):
        sel = alloc.allocate(spectra, Budget(0.9, 400))
    assert sel[0].params((20, 20)) <= 40
