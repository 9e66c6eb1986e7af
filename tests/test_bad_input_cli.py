"""The command line fails the same way everywhere: one paragraph on stderr (no traceback unless
--debug or LOWRANK_DEBUG=1), an exit code that says why, nothing written; results on stdout.

Rows of docs/bad-input.md, through ``lowrank`` itself (click's runner, in-process).
"""

from __future__ import annotations

import json

import pytest
import torch
from bad_input_kit import (
    cli,
    copy_of,
    edit_config,
    one_paragraph,
    save_compressed,
    save_plain,
    text_file,
    tiny_model,
    truncate,
)

import lowrank
import lowrank.data

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {"hf": save_compressed(root / "hf"), "plain": save_plain(root / "plain"),
            "gpt2": save_plain(root / "gpt2", arch="gpt2"), "text": text_file(root)}


def _compress(saved, out, *extra):
    return cli("compress", saved["plain"], "--calib", f"file:{saved['text']}", "--calib-windows", "4",
               "--seqlen", "32", "--eval", f"file:{saved['text']}", "--eval-windows", "2", "--out", out, *extra)


def _no_forward_pass(monkeypatch):
    """Fail the test if anything evaluates the model (the errors must come before)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before the error")

    monkeypatch.setattr(lowrank.data, "perplexity", forbidden)
    monkeypatch.setattr(lowrank, "compress", forbidden)


# -- damaged checkpoints: eval, inspect ----------------------------------------------------------


@pytest.mark.parametrize("verb", ["eval", "inspect"])
def test_truncated_safetensors(saved, tmp_path, verb):
    path = copy_of(saved["hf"], tmp_path / "c")
    truncate(path / "model.safetensors", -4)
    result = cli(verb, path)
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "model.safetensors is truncated" in result.stderr and result.stdout == ""


def test_debug_shows_the_traceback_with_the_same_exit_code(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    truncate(path / "model.safetensors", 100)
    for args, env in ((["--debug", "inspect", path], None), (["inspect", path, "--debug"], None),
                      (["inspect", path], {"LOWRANK_DEBUG": "1"})):
        result = cli(*args, env=env)
        assert result.exit_code == 2
        assert "Traceback (most recent call last)" in result.stderr and "CheckpointError" in result.stderr
        assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["quantization_config"]["rank_pattern"].__setitem__("model.layers.0.self_attn.q_proj", 1000),
     "records rank 1000"),
    (lambda c: c["quantization_config"]["rank_pattern"].__setitem__("model.layers.0.self_attn.q_proj", 2),
     "do not match config.json"),
    (lambda c: c["quantization_config"].__setitem__("exporter", "nope"), "exporter 'nope', which is not installed"),
    (lambda c: c["quantization_config"].__setitem__("format_version", 7), "format_version 7 is newer"),
])
@pytest.mark.parametrize("verb", ["eval", "inspect"])
def test_config_that_does_not_fit_the_checkpoint(saved, tmp_path, edit, match, verb):
    path = copy_of(saved["hf"], tmp_path / "c")
    edit_config(path, edit)
    result = cli(verb, path)
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert match in result.stderr


def test_eval_without_a_tokenizer(tmp_path):
    model, _ = tiny_model()
    model.save_pretrained(tmp_path / "m")
    result = cli("eval", tmp_path / "m")
    assert result.exit_code == 2 and "has no tokenizer" in result.stderr, result.output


# -- devices ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_explicit_cuda_without_cuda(saved, tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lowrank.data, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = _compress(saved, tmp_path / "out", "--device", device)
    assert result.exit_code == 3 and one_paragraph(result.stderr), result.output
    assert f"device '{device}' was asked for, but this machine has no usable CUDA" in result.stderr
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"device: '{device}'\n")
    result = cli("compress", saved["plain"], "--recipe", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 3 and "was asked for" in result.stderr
    result = cli("eval", saved["hf"], "--device", device)
    assert result.exit_code == 3 and "was asked for" in result.stderr


def test_auto_falls_back_to_the_cpu(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("eval", saved["hf"], "--device", "auto", "--data", f"file:{saved['text']}", "--seqlen", "32",
                 "--windows", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device"] == "cpu"


# -- streams, --out, exit codes -----------------------------------------------------------------------


def test_results_on_stdout_progress_on_stderr(saved, tmp_path):
    result = _compress(saved, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "perplexity before:" in out and "perplexity after:" in out and f"wrote {tmp_path / 'out'}" in out
    assert "recipe 'lowrank'" in out and "targets: 21 matrices" in out
    assert "lowrank: compressing" not in out and "block 1/3" in result.stderr  # progress and log: stderr
    result = _compress(saved, tmp_path / "out2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(tmp_path / "out2")  # stdout is the JSON alone
    assert "perplexity before:" in result.stderr


def test_default_output_directory_is_documented_and_never_renumbered(saved, tmp_path, monkeypatch):
    help_text = " ".join(cli("compress", "--help").stdout.split())
    assert "Default: ./<MODEL name>-lowrank-<ratio> in the current directory" in help_text
    assert "refused like any --out if it exists and is not empty" in help_text
    monkeypatch.chdir(tmp_path)
    args = ["compress", saved["plain"], "--calib", f"file:{saved['text']}", "--calib-windows", "2",
            "--seqlen", "32", "--eval", "none", "--ratio", "0.3"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "plain-lowrank-0.3" / "config.json").is_file()
    second = cli(*args)
    assert second.exit_code == 2 and "exists and is not empty" in second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-lowrank-0.3"]


def test_output_directory_not_empty(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(lowrank.data, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _compress(saved, out)
    assert result.exit_code == 2 and one_paragraph(result.stderr) and "exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_help_lists_the_exit_codes():
    text = " ".join(cli("--help").stdout.split())
    assert "Exit codes: 0 success; 1 failure" in text and "130 interrupted" in text


def test_ctrl_c_exits_130_and_writes_nothing(saved, tmp_path, monkeypatch):
    from lowrank_builtin.scalings import Whitening

    calls = {"n": 0}
    fit = Whitening.fit

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # block 1 of 3: block 0 is factored already
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Whitening, "fit", interrupted)
    result = _compress(saved, tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert result.stderr.rstrip().endswith("Error: interrupted (Ctrl-C); nothing was written")
    assert "Aborted!" not in result.output and calls["n"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(lowrank.data, "perplexity", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = cli("eval", saved["hf"], "--data", f"file:{saved['text']}", "--seqlen", "32", "--windows", "2")
    assert result.exit_code == 130 and "interrupted" in result.stderr


def test_an_unexpected_error_exits_1_and_says_how_to_see_more(saved, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("something inside broke")

    monkeypatch.setattr(lowrank, "inspect_model", broken)
    result = cli("inspect", saved["hf"])
    assert result.exit_code == 1 and one_paragraph(result.stderr), result.output
    assert "unexpected TypeError: something inside broke" in result.stderr and "--debug" in result.stderr


def test_model_that_does_not_exist(tmp_path):
    result = cli("eval", tmp_path / "nope")
    assert result.exit_code == 2 and "is not a directory" in result.stderr and one_paragraph(result.stderr)
    result = cli("eval", "no-such-org/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in result.stderr and "Traceback" not in result.output


# -- errors that come early: before "perplexity before" -------------------------------------------------


def test_targets_matching_nothing_fail_before_any_forward_pass(saved, tmp_path, monkeypatch):
    _no_forward_pass(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("targets: [attn.nothing]\n")
    result = _compress(saved, tmp_path / "out", "--recipe", recipe)
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "match no linear layer" in result.stderr and "perplexity before" not in result.output
    assert not (tmp_path / "out").exists()


def test_nan_weights_fail_before_any_forward_pass(saved, tmp_path, monkeypatch):
    model, tokenizer = tiny_model()
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.weight[3, 3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    _no_forward_pass(monkeypatch)
    saved = {**saved, "plain": tmp_path / "nan"}
    result = _compress(saved, tmp_path / "out")
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "non-finite (NaN or inf) weights in model.layers.2.self_attn.v_proj.weight" in result.stderr


def test_unsupported_architecture_names_what_was_looked_for(saved, tmp_path, monkeypatch):
    model, tokenizer = tiny_model()
    model.model.layers = torch.nn.Sequential(*model.model.layers)  # no ModuleList of blocks
    monkeypatch.setattr(lowrank.data, "load_model", lambda *a, **k: (model, tokenizer))
    _no_forward_pass(monkeypatch)
    result = _compress(saved, tmp_path / "out")
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert ("unsupported architecture LlamaForCausalLM: lowrank looks for its decoder blocks as an "
            "nn.ModuleList of 3 modules") in " ".join(result.stderr.split())


def test_windows_longer_than_the_context(saved, tmp_path, monkeypatch):
    # the tiny GPT-2 has 64 positions
    result = cli("eval", saved["gpt2"], "--data", f"file:{saved['text']}", "--seqlen", "128", "--windows", "1")
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "evaluation windows of 128 tokens are longer than the model's context of 64 positions" in result.stderr
    _no_forward_pass(monkeypatch)
    result = cli("compress", saved["gpt2"], "--calib", f"file:{saved['text']}", "--calib-windows", "2",
                 "--seqlen", "128", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "calibration: windows of 128 tokens are longer" in result.stderr


@pytest.mark.parametrize("text", ["", "   \n\n  "])
def test_empty_calibration_source(saved, tmp_path, monkeypatch, text):
    empty = tmp_path / "empty.txt"
    empty.write_text(text)
    _no_forward_pass(monkeypatch)
    result = _compress({**saved, "text": empty}, tmp_path / "out")
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert f"text source 'file:{empty}' is empty" in result.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_source_too_short_or_unknown(saved, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _no_forward_pass(monkeypatch)
    result = _compress({**saved, "text": short}, tmp_path / "out")
    assert result.exit_code == 2 and "calibration windows of 32 tokens need at least 32" in result.stderr
    result = cli("compress", saved["plain"], "--calib", "nowhere:x", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "unknown text source 'nowhere:x'" in result.stderr
