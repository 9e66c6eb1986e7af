"""Numerics never crash: a rank-deficient or all-zero Gram, a dead input channel, weights of 1e6
magnitude, float16 and bfloat16 models go through every scaling and every allocator. Each run
either succeeds or falls back, and the report says which fallback ran, on the matrix it ran on.

Rows of docs/bad-input.md ("Numerics").
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calibration

import lowrank

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

ZERO_GRAM = "model.layers.1.mlp.down_proj"  # its inputs are all zero: up_proj and gate_proj are


def _model(condition: str):
    model = build("llama")
    with torch.no_grad():
        if condition == "all-zero Gram":
            model.model.layers[1].mlp.up_proj.weight.zero_()
            model.model.layers[1].mlp.gate_proj.weight.zero_()
        elif condition == "dead input channel":  # rank-deficient Gram of q/k/v and of an MLP
            model.model.layers[0].input_layernorm.weight[5] = 0
            model.model.layers[2].post_attention_layernorm.weight[7] = 0
        elif condition == "1e6 weights":
            model.model.layers[1].mlp.up_proj.weight.mul_(1e6)
            model.model.layers[0].self_attn.v_proj.weight.mul_(1e6)
        elif condition == "float16":
            model = model.half()
        elif condition == "bfloat16":
            model = model.bfloat16()
    return model


CONDITIONS = ["all-zero Gram", "dead input channel", "1e6 weights", "float16", "bfloat16"]
SCALINGS = ["identity", "asvd", "whitening", "fwsvd", {"sigmascale": {"steps": 3}}]
ALLOCATORS = ["energy", {"energy": {"fraction": 0.9}}, "loss-aware",
              {"sensitivity": {"windows": 1, "candidates": [0.3, 0.6], "cache": False, "progress": False}},
              {"zero-sum": {"gradient_seqlen": 16, "correction_seqlen": 16}}]
RECIPES = ([dict(scalings=[s], allocator="uniform") for s in SCALINGS]
           + [dict(scalings=["whitening"], allocator=a) for a in ALLOCATORS])


def _label(kw) -> str:
    name = lambda spec: spec if isinstance(spec, str) else next(iter(spec))  # noqa: E731
    return f"{name(kw['scalings'][0])}+{name(kw['allocator'])}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[_label(r) for r in RECIPES])
@pytest.mark.parametrize("condition", CONDITIONS)
def test_every_strategy_survives(condition, recipe):
    model = _model(condition)
    dtype = model.dtype
    report = lowrank.compress(model, lowrank.Recipe(ratio=0.3, **recipe), calibration(4, 16), progress=False)
    assert report.matrices and all(m.params_after <= m.params_before for m in report.matrices)
    factored = [m for m in model.modules() if isinstance(m, lowrank.LowRankLinear)]
    assert factored and all(m.A.dtype == dtype and torch.isfinite(m.A).all() and torch.isfinite(m.B).all()
                            for m in factored)
    with torch.no_grad():
        assert torch.isfinite(model(calibration(2, 8)).logits.float()).all()


@pytest.mark.parametrize("scaling, note", [
    ("whitening", "whitening: input covariance is zero or non-finite; identity used"),
    ("fwsvd", "fwsvd: zero or non-finite Fisher information; identity used"),
    ({"sigmascale": {"steps": 3}}, "sigmascale: learning did not beat the identity; identity kept"),
])
def test_the_report_names_the_fallback_and_its_matrix(scaling, note):
    model = _model("all-zero Gram")
    report = lowrank.compress(model, lowrank.Recipe(scalings=[scaling], ratio=0.3), calibration(4, 16),
                              progress=False)
    assert note in report.notes
    assert ZERO_GRAM in [m.name for m in report.matrices if note in m.notes]
    if scaling == "whitening":  # only the matrix whose inputs are all zero
        assert [m.name for m in report.matrices if note in m.notes] == [ZERO_GRAM]


@pytest.mark.parametrize("condition", ["float16", "bfloat16"])
def test_half_precision_checkpoints_round_trip(condition, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(condition)
    lowrank.compress(model, lowrank.Recipe(ratio=0.3), calibration(4, 16), progress=False)
    with torch.no_grad():
        expected = model(calibration(2, 8)).logits
    out = lowrank.save(model, tmp_path / "out")
    loaded, plain = lowrank.load(out), AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == plain.dtype == model.dtype
    with torch.no_grad():
        logits = loaded(calibration(2, 8)).logits
        assert torch.equal(plain(calibration(2, 8)).logits, logits)
    # the model was made by .half() / .bfloat16(), which also rounded its rotary table; a load keeps
    # that table in float32 as from_pretrained does, so the logits agree to half precision only
    torch.testing.assert_close(logits.float(), expected.float(), atol=3e-2, rtol=0)
