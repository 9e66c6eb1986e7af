"""Streamed compression (``lowrank.compress_checkpoint``), resumable runs and multi-process runs.

A streamed run reads each block from the shards and writes it at once; it must give the very
checkpoint the in-memory ``compress`` + ``save`` gives, bit for bit. A run killed after block k and
resumed must equal an uninterrupted one, and a 2-process gloo run must equal a 1-process run up to
floating-point summation order.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_models import build, calibration

import lowrank

RECIPE = dict(ratio=0.3)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]
    for name in ("config.json", "generation_config.json", "recipe.yaml"):
        assert (a / name).read_text() == (b / name).read_text(), name


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for arch in ("llama", "gemma3", "gpt2"):
        build(arch).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_streamed_equals_in_memory(sources, tmp_path, arch):
    recipe = lowrank.Recipe(**RECIPE)
    model = lowrank.load(sources[arch])
    lowrank.compress(model, recipe, calibration(), progress=False)
    lowrank.save(model, tmp_path / "memory")
    report = lowrank.compress_checkpoint(sources[arch], tmp_path / "stream", recipe, calibration(), progress=False)
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # one shard per block, one for the rest
    assert report.ratio_achieved == pytest.approx(model.lowrank_report.ratio_achieved)
    reloaded = lowrank.load(tmp_path / "stream")
    ids = calibration(2)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".*lowrank-work"))


@pytest.mark.parametrize("options", [
    dict(inputs="original"), dict(target="compensated", scalings=["whitening"]),
    dict(scalings=["whitening"], corrections=[{"aa-svd": {"epochs": 2, "lr": 1e-3, "progress": False}}]),
], ids=["original-inputs", "compensated-target", "aa-svd"])
def test_streamed_equals_in_memory_for_other_input_streams(sources, tmp_path, monkeypatch, options):
    from lowrank._engine.stream import StreamHooks

    recipe = lowrank.Recipe(ratio=0.3, **options)
    model = lowrank.load(sources["llama"])
    lowrank.compress(model, recipe, calibration(), progress=False)
    lowrank.save(model, tmp_path / "memory")
    enter = StreamHooks.enter

    def dies_at_block_1(self, index, phase):
        if index == 1 and phase == "compressing":
            raise RuntimeError("killed")
        enter(self, index, phase)

    monkeypatch.setattr(StreamHooks, "enter", dies_at_block_1)
    with pytest.raises(RuntimeError, match="killed"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "stream", recipe, calibration(), progress=False)
    monkeypatch.setattr(StreamHooks, "enter", enter)
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "stream", recipe, calibration(), progress=False,
                                resume=True)
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream")


def test_streamed_global_allocator_plans_in_a_streamed_pass(sources, tmp_path):
    recipe = lowrank.Recipe(allocator="energy", ratio=0.3)
    assert recipe.allocator.scope == "global"
    model = lowrank.load(sources["llama"])
    lowrank.compress(model, recipe, calibration(), progress=False)
    lowrank.save(model, tmp_path / "memory")
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "stream", recipe, calibration(), progress=False)
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream")


def dying_at(enter, block: int, error: type[BaseException] = KeyboardInterrupt):
    """``StreamHooks.enter`` that raises ``error`` when the compression pass reaches ``block``."""

    def dies(self, index, phase):
        if index == block and phase == "compressing":
            raise error
        enter(self, index, phase)

    return dies


@pytest.mark.parametrize("allocator", ["uniform", "energy"])
def test_killed_after_block_k_and_resumed_equals_uninterrupted(sources, tmp_path, monkeypatch, allocator):
    from lowrank._engine.stream import StreamHooks

    recipe = lowrank.Recipe(allocator=allocator, ratio=0.3, scalings=["whitening"])
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "whole", recipe, calibration(), progress=False)
    enter = StreamHooks.enter
    monkeypatch.setattr(StreamHooks, "enter", dying_at(enter, 2))
    with pytest.raises(KeyboardInterrupt):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False)
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.lowrank-work"
    assert json.loads((work / "state.json").read_text())["state"]["done"] == 2
    with pytest.raises(lowrank.CompressionError, match="--resume"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False)
    with pytest.raises(lowrank.CompressionError, match="another model, recipe"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(seed=1),
                                    progress=False, resume=True)
    monkeypatch.setattr(StreamHooks, "enter", enter)
    torch.manual_seed(1234)  # the resumed run restores the RNG state it needs
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False,
                                resume=True)
    _same_checkpoint(tmp_path / "whole", tmp_path / "out")
    assert not work.exists()


def test_bad_input_writes_nothing(sources, tmp_path):
    recipe = lowrank.Recipe(**RECIPE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(lowrank.LowrankError, match="not empty"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "full", recipe, calibration())
    with pytest.raises(lowrank.CompressionError, match="no model.safetensors|config.json"):
        lowrank.compress_checkpoint(tmp_path / "full", tmp_path / "o1", recipe, calibration())
    with pytest.raises(lowrank.CompressionError, match="token ids"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "o2", recipe, calibration() + 1000)
    with pytest.raises(lowrank.CompressionError, match="cannot write a streamed"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "o3", lowrank.Recipe(exporter="dense"), calibration())
    broken = tmp_path / "broken"
    build("llama").save_pretrained(broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(lowrank.CompressionError, match="up_proj"):
        lowrank.compress_checkpoint(broken, tmp_path / "o4", recipe, calibration(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "full"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("options", [dict(allocator={"zero-sum": {"gradient_windows": 2, "gradient_seqlen": 16}}),
                                     dict(scalings=["fwsvd"])], ids=["zero-sum", "fwsvd"])
def test_streamed_gradient_pass_equals_in_memory(sources, tmp_path, arch, options):
    """Zero-sum's scores and fwsvd's statistics come from a gradient pass, which a streamed run
    makes one block at a time: the same ranks, and factors equal up to summation order."""
    recipe = lowrank.Recipe(ratio=0.3, **{"scalings": ["whitening"], **options})
    model = lowrank.load(sources[arch])
    memory = lowrank.compress(model, recipe, calibration(), progress=False)
    lowrank.save(model, tmp_path / "memory")
    streamed = lowrank.compress_checkpoint(sources[arch], tmp_path / "stream", recipe, calibration(), progress=False)
    assert [m.rank for m in streamed.matrices] == [m.rank for m in memory.matrices]
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    assert any("gradient pass" in n for n in streamed.notes)


@pytest.mark.parametrize("allocator, match", [
    ({"zero-sum": {"gradient_windows": 2, "gradient_seqlen": 16, "stages": 2}}, "2 stages"),
    ({"sensitivity": {"candidates": [0.5, 0.9], "windows": 1, "cache": False, "progress": False}}, "whole model"),
], ids=["multi-stage", "sensitivity"])
def test_a_recipe_that_needs_the_whole_model_is_refused(sources, tmp_path, allocator, match):
    recipe = lowrank.Recipe(allocator=allocator, scalings=["whitening"], ratio=0.3)
    with pytest.raises(lowrank.CompressionError, match=match):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, source: str, out: str, options: dict | None = None) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        lowrank.compress_checkpoint(source, out, lowrank.Recipe(**{**RECIPE, **(options or {})}), calibration(),
                                    progress=False, batch_size=2)
    finally:
        dist.destroy_process_group()


GRADIENT_RECIPES = {
    "zero-sum": dict(scalings=["whitening"], allocator={"zero-sum": {"gradient_windows": 2, "gradient_seqlen": 16}}),
    "fwsvd": dict(scalings=["fwsvd"]),
}


@pytest.mark.parametrize("recipe_name", [None, *GRADIENT_RECIPES])
def test_two_gloo_processes_equal_one(sources, tmp_path, recipe_name):
    """The windows and the SVDs split across two processes; gradient passes (zero-sum's scores,
    fwsvd's statistics) run in both over all the windows, and process 0's plan is applied."""
    options = GRADIENT_RECIPES.get(recipe_name, {})
    recipe = lowrank.Recipe(**{**RECIPE, **options})
    single = lowrank.compress_checkpoint(sources["llama"], tmp_path / "one", recipe, calibration(), progress=False,
                                         batch_size=2)
    args = (2, _free_port(), str(sources["llama"]), str(tmp_path / "two"), options)
    other = mp.get_context("spawn").Process(target=_worker, args=(1, *args))  # rank 1; this process is rank 0
    other.start()
    try:
        _worker(0, *args)
    finally:
        other.join(timeout=120)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:  # factors are defined up to rotations within near-equal singular values: compare A B
        if name.endswith(".A"):
            b = name[:-1] + "B"
            torch.testing.assert_close(two[name] @ two[b], one[name] @ one[b], rtol=1e-4, atol=1e-4, msg=name)
        elif not name.endswith(".B"):
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    ids = calibration(2)
    logits = [lowrank.load(tmp_path / d)(ids).logits for d in ("one", "two")]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "one" / "config.json").read_text() == (tmp_path / "two" / "config.json").read_text()
    if recipe_name is not None:
        report = json.loads((tmp_path / "two" / "lowrank_report.json").read_text())
        assert [m["rank"] for m in report["matrices"]] == [m.rank for m in single.matrices]
        assert any("ran in each of the 2 processes" in n for n in report["notes"])


def _word_tokenizer():
    """A 128-word tokenizer built offline (no hub), enough to cut calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 128)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def test_cli_stream_and_resume(sources, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lowrank._engine.stream import StreamHooks
    from lowrank.cli import main

    model = tmp_path / "model"
    build("llama").save_pretrained(model)
    _word_tokenizer().save_pretrained(model)
    args = ["compress", str(model), "--stream", "--out", str(tmp_path / "out"), "--calib-windows", "4",
            "--seqlen", "32", "--ratio", "0.3"]
    enter = StreamHooks.enter

    def dies(self, index, phase):
        if index == 1:
            raise KeyboardInterrupt
        enter(self, index, phase)

    monkeypatch.setattr(StreamHooks, "enter", dies)
    assert CliRunner().invoke(main, args).exit_code == 130
    monkeypatch.setattr(StreamHooks, "enter", enter)
    result = CliRunner().invoke(main, [*args, "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["streamed"] is True
    assert lowrank.load(tmp_path / "out").lowrank_recipe.ratio == 0.3
    assert (tmp_path / "out" / "tokenizer.json").is_file()
