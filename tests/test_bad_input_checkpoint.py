"""Checkpoints are data from anyone: read only through safetensors and checked against their
config.json (shapes, ranks, dtypes, counts) before any tensor is used.

Rows of docs/bad-input.md ("Checkpoints"), through the Python API: ``lowrank.load``, plain
``from_pretrained`` after ``import lowrank``, and ``lowrank.data.load_model``.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from bad_input_kit import copy_of, edit_config, save_compressed, save_plain, truncate

import lowrank
from lowrank import CheckpointError, DeviceError

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {"hf": save_compressed(root / "hf"), "dense": save_compressed(root / "dense", exporter="dense"),
            "plain": save_plain(root / "plain")}


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _both(path):
    """lowrank.load and from_pretrained must refuse ``path`` the same way."""
    return [lambda: lowrank.load(path), lambda: _from_pretrained(path)]


@pytest.mark.parametrize("keep", [0, 5, 100, -1000, -4])
def test_truncated_safetensors(saved, tmp_path, keep):
    path = copy_of(saved["hf"], tmp_path / "c")
    truncate(path / "model.safetensors", keep)
    for load in _both(path):
        with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
            load()


@pytest.mark.parametrize("kind", ["dense", "plain"])
def test_truncated_safetensors_of_an_ordinary_checkpoint(saved, tmp_path, kind):
    from lowrank.data import load_model

    path = copy_of(saved[kind], tmp_path / "c")
    truncate(path / "model.safetensors", -4)
    with pytest.raises(CheckpointError, match="is truncated"):
        lowrank.load(path)
    with pytest.raises(CheckpointError, match="is truncated"):
        load_model(str(path))


def _rewrite_header(path, edit):
    """Apply ``edit(header)`` to a safetensors file's JSON header, keeping the data as it is."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_corrupt_header(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[10:20] = b"\xff" * 10
    (path / "model.safetensors").write_bytes(bytes(raw))
    for load in _both(path):
        with pytest.raises(CheckpointError, match="header is not valid JSON"):
            load()


def test_rank_larger_than_the_matrix(saved, tmp_path):
    """The issue's case: config says rank 1000 for a 64 x 64 layer, and the tensors agree."""
    from safetensors.torch import load_file, save_file

    path = copy_of(saved["hf"], tmp_path / "c")
    name = "model.layers.0.self_attn.q_proj"
    state = load_file(path / "model.safetensors")
    state[f"{name}.A"], state[f"{name}.B"] = torch.zeros(64, 1000), torch.zeros(1000, 64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    edit_config(path, lambda c: c["quantization_config"]["rank_pattern"].__setitem__(name, 1000))
    for load in _both(path):
        with pytest.raises(CheckpointError, match=r"rank 1000 for 'model.layers.0.self_attn.q_proj', a 64 x 64 "
                                                  r"matrix, whose rank is at most 64"):
            load()


def test_tensors_that_do_not_match_the_config(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    name = "model.layers.1.mlp.up_proj"
    edit_config(path, lambda c: c["quantization_config"]["rank_pattern"].__setitem__(name, 3))
    for load in _both(path):
        with pytest.raises(CheckpointError, match=r"do not match config.json: model.layers.1.mlp.up_proj.A is \[160, \d+\] "
                                                  r"in model.safetensors, but config.json implies \[160, 3\]"):
            load()


def test_a_tensor_missing_or_extra_or_of_the_wrong_dtype(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    file = path / "model.safetensors"
    _rewrite_header(file, lambda h: h.pop("model.norm.weight"))
    for load in _both(path):
        with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing, e.g. model.norm.weight"):
            load()
    path = copy_of(saved["hf"], tmp_path / "d")
    _rewrite_header(path / "model.safetensors",
                    lambda h: h.__setitem__("model.extra.weight", dict(h["model.norm.weight"])))
    with pytest.raises(CheckpointError, match="the architecture has no place for, e.g. model.extra.weight"):
        lowrank.load(path)
    path = copy_of(saved["hf"], tmp_path / "e")
    _rewrite_header(path / "model.safetensors", lambda h: h["model.norm.weight"].__setitem__("dtype", "I32"))
    with pytest.raises(CheckpointError, match="model.norm.weight is stored as I32, not as floating point"):
        lowrank.load(path)


def test_fewer_factored_layers_than_recorded(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    edit_config(path, lambda c: c["quantization_config"]["rank_pattern"].pop("model.layers.2.mlp.down_proj"))
    with pytest.raises(CheckpointError, match="no place for, e.g. model.layers.2.mlp.down_proj.A"):
        lowrank.load(path)


def test_unknown_exporter(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    edit_config(path, lambda c: c["quantization_config"].__setitem__("exporter", "gguf-magic"))
    with pytest.raises(CheckpointError, match="written by the exporter 'gguf-magic', which is not installed here"):
        lowrank.load(path)


@pytest.mark.parametrize("version, match", [(2, "format_version 2 is newer than this lowrank reads"),
                                            ("1", "must be a positive integer"),
                                            (True, "must be a positive integer")])
def test_newer_or_malformed_format_version(saved, tmp_path, version, match):
    path = copy_of(saved["hf"], tmp_path / "c")
    edit_config(path, lambda c: c["quantization_config"].__setitem__("format_version", version))
    with pytest.raises(CheckpointError, match=match):
        lowrank.load(path)
    if version == 2:
        with pytest.raises(CheckpointError, match=match):
            _from_pretrained(path)


def test_config_json_not_utf8_or_not_an_object(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    (path / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    with pytest.raises(CheckpointError, match="config.json: not UTF-8"):
        lowrank.load(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        lowrank.load(path)
    (path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(CheckpointError, match="transformers cannot build a config"):
        lowrank.load(path)


def test_only_pickle_weights_are_never_loaded(saved, tmp_path):
    path = copy_of(saved["plain"], tmp_path / "c")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle files \(pytorch_model.bin\), which lowrank never loads"):
        lowrank.load(path)


def test_index_naming_files_outside_or_missing(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="names files outside the directory"):
        lowrank.load(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="the index names model-2.safetensors, which is missing"):
        lowrank.load(path)


def test_explicit_device_that_is_not_there(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{device}' was asked for, but this machine has no usable CUDA"):
            lowrank.load(saved["hf"], device=device)
    assert next(lowrank.load(saved["hf"], device="auto").parameters()).device.type == "cpu"


def test_an_unreadable_report_is_a_warning_not_an_error(saved, tmp_path):
    path = copy_of(saved["hf"], tmp_path / "c")
    (path / "lowrank_report.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="not its lowrank_report.json"):
        model = lowrank.load(path)
    assert not hasattr(model, "lowrank_report")


def test_good_checkpoints_still_load(saved):
    from lowrank.data import load_model

    for kind in ("hf", "dense", "plain"):
        model = lowrank.load(saved[kind])
        with torch.no_grad():
            assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
    assert isinstance(_from_pretrained(saved["hf"]).model.layers[0].mlp.up_proj, lowrank.LowRankLinear)
    load_model(str(saved["plain"]))


def test_tied_embeddings_still_load(tmp_path):
    """A tied lm_head is stored once; the check must not call it missing."""
    from tiny_models import calibration
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).eval()
    lowrank.compress(model, lowrank.Recipe(ratio=0.3), calibration(4, 16), progress=False)
    out = lowrank.save(model, tmp_path / "tied")
    for loaded in (lowrank.load(out), _from_pretrained(out)):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
