"""The ``hf`` and ``dense`` exporters, ``lowrank.save``/``lowrank.load`` and plain ``from_pretrained``."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowrank
from lowrank import LowRankLinear

VOCAB = 128
ARCHS = ("llama", "gpt2")
RECIPE_ARGS = dict(scalings=["whitening"], allocator="uniform", ratio=0.3)
REPO = Path(__file__).resolve().parents[1]


def tiny(arch: str, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_config(config, **kwargs).eval()


@functools.lru_cache(maxsize=None)
def _compressed(arch: str, model_dtype: torch.dtype | None, recipe: tuple):
    model = tiny(arch, model_dtype)
    calibration = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    lowrank.compress(model, lowrank.Recipe(**{**RECIPE_ARGS, **dict(recipe)}), calibration, progress=False)
    return model


def compressed(arch: str, model_dtype: torch.dtype | None = None, **recipe):
    """A compressed tiny model (a private copy: compressing is the slow part, so it is cached)."""
    return copy.deepcopy(_compressed(arch, model_dtype, tuple((k, tuple(v) if isinstance(v, list) else v)
                                                         for k, v in sorted(recipe.items()))))


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(probe()).logits


def run_python(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a fresh interpreter (offline), failing the test with its output."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# -- hf ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_roundtrip_with_lowrank_load(arch, tmp_path):
    model = compressed(arch)
    out = lowrank.save(model, tmp_path / "out")
    assert {"config.json", "model.safetensors", "recipe.yaml", "lowrank_report.json"} <= set(os.listdir(out))
    loaded = lowrank.load(out)
    assert torch.equal(logits(loaded), logits(model))
    assert lowrank.count_parameters(loaded) == lowrank.count_parameters(model) == model.lowrank_report.model_params_after
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks and ranks == {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert not loaded.training
    # the provenance comes back with it, so a re-save keeps it
    assert loaded.lowrank_recipe == model.lowrank_recipe
    assert loaded.lowrank_report.to_dict() == model.lowrank_report.to_dict()


def test_hf_loads_with_plain_from_pretrained_after_import_lowrank(tmp_path):
    models = {arch: compressed(arch) for arch in ARCHS}  # one interpreter for both: startup is slow
    dirs = {arch: str(lowrank.save(model, tmp_path / arch)) for arch, model in models.items()}
    torch.save(probe(), tmp_path / "x.pt")
    run_python(f"""
        import sys
        import lowrank
        assert "torch" not in sys.modules and "transformers" not in sys.modules  # import lowrank stays light
        import torch
        from transformers import AutoModelForCausalLM
        results = {{}}
        for arch, path in {dirs!r}.items():
            model = AutoModelForCausalLM.from_pretrained(path)
            with torch.no_grad():
                logits = model(torch.load("x.pt")).logits
            factored = sum(isinstance(m, lowrank.LowRankLinear) for m in model.modules())
            results[arch] = {{"logits": logits, "params": lowrank.count_parameters(model), "factored": factored}}
        torch.save(results, "out.pt")
    """, tmp_path)
    results = torch.load(tmp_path / "out.pt")
    for arch, model in models.items():
        assert torch.equal(results[arch]["logits"], logits(model)), arch
        assert results[arch]["params"] == lowrank.count_parameters(model)
        assert results[arch]["factored"] == sum(isinstance(m, LowRankLinear) for m in model.modules())


def test_quantizer_registers_when_transformers_came_first(tmp_path):
    run_python("""
        import transformers.modeling_utils
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
        assert "lowrank" not in AUTO_QUANTIZER_MAPPING
        import lowrank
        assert AUTO_QUANTIZER_MAPPING["lowrank"].__name__ == "LowRankHfQuantizer"
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowrank"].__name__ == "LowRankConfig"
    """, tmp_path)


def test_hf_bfloat16_roundtrip_is_bit_identical(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed("llama", torch.bfloat16)
    out = lowrank.save(model, tmp_path / "out")
    for loaded in (lowrank.load(out), AutoModelForCausalLM.from_pretrained(out)):
        assert loaded.dtype == torch.bfloat16
        assert torch.equal(logits(loaded), logits(model))
    assert lowrank.load(out, dtype="float32").dtype == torch.float32


def test_factors_stored_narrower_than_the_model_reload_as_stored(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed("llama", dtype="bfloat16")  # recipe dtype: bf16 factors in a float32 model
    assert model.dtype == torch.float32
    out = lowrank.save(model, tmp_path / "out")
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["dtype_pattern"] == dict.fromkeys(record["rank_pattern"], "bfloat16")
    for loaded in (lowrank.load(out), AutoModelForCausalLM.from_pretrained(out)):
        assert {m.A.dtype for m in loaded.modules() if isinstance(m, LowRankLinear)} == {torch.bfloat16}
        assert torch.equal(logits(loaded), logits(model))
    dense = lowrank.load(lowrank.save(model, tmp_path / "dense", exporter="dense"))
    assert {p.dtype for p in dense.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(dense), logits(model), atol=1e-2, rtol=0)  # bf16 activations before


def test_config_records_the_factorization(tmp_path):
    model = compressed("llama", ignore=["*.v_proj"])
    out = lowrank.save(model, tmp_path / "out")
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "lowrank" and record["format_version"] == 1
    assert record["exporter"] == "hf"
    assert record["rank_pattern"] == {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert record["targets"] is None and record["ignore"] == ["*.v_proj"]
    assert record["recipe_name"] == model.lowrank_recipe.name
    assert record["lowrank_version"] == lowrank.__version__
    assert lowrank.Recipe.load(out / "recipe.yaml") == model.lowrank_recipe
    report = json.loads((out / "lowrank_report.json").read_text())
    assert report["model_params_after"] == lowrank.count_parameters(model)


def test_resaving_a_from_pretrained_model_keeps_the_record(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed("gpt2")
    first = lowrank.save(model, tmp_path / "first")
    again = lowrank.save(AutoModelForCausalLM.from_pretrained(first), tmp_path / "again")
    a, b = (json.loads((p / "config.json").read_text())["quantization_config"] for p in (first, again))
    assert a == b
    assert (again / "recipe.yaml").read_text() == (first / "recipe.yaml").read_text()
    assert (again / "lowrank_report.json").read_text() == (first / "lowrank_report.json").read_text()
    assert torch.equal(logits(lowrank.load(again)), logits(model))


# -- dense ------------------------------------------------------------------------------------------


def test_dense_loads_without_lowrank(tmp_path):
    models = {arch: compressed(arch) for arch in ARCHS}
    dirs = {arch: lowrank.save(model, tmp_path / arch, exporter="dense") for arch, model in models.items()}
    for arch, out in dirs.items():
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        assert lowrank.Recipe.load(out / "recipe.yaml") == models[arch].lowrank_recipe
    torch.save(probe(), tmp_path / "x.pt")
    run_python(f"""
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        results = {{}}
        for arch, path in {({a: str(d) for a, d in dirs.items()})!r}.items():
            model = AutoModelForCausalLM.from_pretrained(path)
            with torch.no_grad():
                logits = model(torch.load("x.pt")).logits
            params = sum(p.numel() for p in {{id(p): p for p in model.parameters()}}.values())
            results[arch] = {{"logits": logits, "params": params}}
        assert "lowrank" not in sys.modules
        torch.save(results, "out.pt")
    """, tmp_path)
    results = torch.load(tmp_path / "out.pt")
    for arch, model in models.items():
        torch.testing.assert_close(results[arch]["logits"], logits(model), atol=1e-4, rtol=0)
        assert results[arch]["params"] == model.lowrank_report.model_params_before  # dense again
        # lowrank.load reads it too (a plain checkpoint)
        assert torch.equal(logits(lowrank.load(dirs[arch])), results[arch]["logits"])


def test_recipe_exporter_is_the_default(tmp_path):
    model = compressed("llama", exporter="dense")
    out = lowrank.save(model, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(isinstance(m, LowRankLinear) for m in lowrank.load(out).modules())


def test_uncompressed_model_only_exports_dense(tmp_path):
    model = tiny("llama")
    with pytest.raises(lowrank.LowrankError, match="never compressed"):
        lowrank.save(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = lowrank.save(model, tmp_path / "dense", exporter="dense")
    assert torch.equal(logits(lowrank.load(out)), logits(model))


# -- safety -----------------------------------------------------------------------------------------


class FakeTokenizer:
    def save_pretrained(self, directory):
        Path(directory, "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("exporter", ["hf", "dense"])
def test_save_leaves_the_model_unchanged(exporter, tmp_path):
    model = compressed("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, config_dict = model.config, model.config.to_dict()
    modules = [type(m) for m in model.modules()]
    out = lowrank.save(model, tmp_path / "out", exporter=exporter, tokenizer=FakeTokenizer())
    assert (out / "tokenizer.json").is_file()
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.config is config and model.config.to_dict() == config_dict
    assert not hasattr(model.config, "quantization_config")
    assert [type(m) for m in model.modules()] == modules


@pytest.mark.parametrize("exporter", ["hf", "dense"])
def test_existing_non_empty_directory_is_refused(exporter, tmp_path):
    model = compressed("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(lowrank.LowrankError, match="not empty"):
        lowrank.save(model, target, exporter=exporter)
    assert os.listdir(target) == ["keep.txt"] and not partials(tmp_path)
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    lowrank.save(model, tmp_path / "empty", exporter=exporter)


@pytest.mark.parametrize("exporter", ["hf", "dense"])
def test_failed_write_leaves_no_directory(exporter, tmp_path, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail)
    model = compressed("llama")
    with pytest.raises(OSError, match="disk full"):
        lowrank.save(model, tmp_path / "out", exporter=exporter)
    assert os.listdir(tmp_path) == []


def test_unknown_exporter_and_missing_directory(tmp_path):
    model = compressed("llama")
    with pytest.raises(lowrank.RegistryError, match="unknown exporter"):
        lowrank.save(model, tmp_path / "out", exporter="nope")
    with pytest.raises(lowrank.LowrankError, match="no config.json"):
        lowrank.load(tmp_path / "missing")


def test_newer_format_is_refused(tmp_path):
    out = lowrank.save(compressed("llama"), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(lowrank.LowrankError, match="format_version"):
        lowrank.load(out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hf_roundtrip_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed("llama").to("cuda")
    x = probe().to("cuda")
    with torch.no_grad():
        ref = model(x).logits
    out = lowrank.save(model, tmp_path / "out")
    dense = lowrank.save(model, tmp_path / "dense", exporter="dense")
    for loaded in (lowrank.load(out, device="cuda"), AutoModelForCausalLM.from_pretrained(out, device_map="cuda")):
        assert next(loaded.parameters()).device.type == "cuda"
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)
        assert lowrank.count_parameters(loaded) == lowrank.count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(lowrank.load(dense, device="cuda")(x).logits, ref, atol=1e-4, rtol=0)
