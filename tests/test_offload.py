"""Hidden states offloaded to disk in a streamed run (``compress_checkpoint(offload=...)``).

In float32 the offloaded run must give the in-memory checkpoint bit for bit (and so must a run
killed after block k and resumed); in bfloat16 it must stay close and say that it rounded. The
files must go when nothing reads them any more, and bad settings must fail before anything is
written.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from test_stream import _same_checkpoint, _word_tokenizer, dying_at, sources  # noqa: F401  (the module fixture)
from tiny_models import build, calibration

import lowrank

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the store --------------------------------------------------------------------------------------


def test_disk_store_round_trip_exact_in_float32_and_rounded_in_bfloat16(tmp_path):
    from lowrank._engine.offload import DiskStore, OffloadedBatches

    batches = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batches.append(torch.randn(1, 5, 8))   # a smaller last batch
    exact = DiskStore(tmp_path / "a", "float32", torch.device("cpu")).keep(iter(batches))
    assert isinstance(exact, OffloadedBatches) and len(exact) == 4
    assert all(torch.equal(x, y) for x, y in zip(exact, batches))
    assert exact[-1].shape == (1, 5, 8) and exact[1:3][1].shape == (2, 5, 8)
    rounded = DiskStore(tmp_path / "b", "bfloat16", torch.device("cpu")).keep(batches)
    for x, y in zip(rounded, batches):
        assert x.dtype == torch.float32   # back in the compute dtype
        torch.testing.assert_close(x, y.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert rounded.nbytes == sum(b.numel() for b in batches) * 2


def test_offloaded_file_goes_with_the_last_reader(tmp_path):
    from lowrank._engine.offload import DiskStore

    store = DiskStore(tmp_path, "float16", torch.device("cpu"))
    stream = store.keep([torch.ones(2, 3, 4)])
    path = stream.path
    assert path.is_file()
    linked = tmp_path / "saved.bin"
    record = stream.link(linked)
    del stream
    gc.collect()
    assert not path.exists() and linked.is_file()   # the hard link a resumed run reads survives
    reopened = type(store.keep([])).opened(record, tmp_path, store, torch.device("cpu"))
    assert torch.equal(reopened[0], torch.ones(2, 3, 4))


def test_same_stream():
    from lowrank._engine.offload import same_stream

    a = [torch.zeros(1), torch.ones(1)]
    assert same_stream(a, a) and same_stream(a, list(a)) and not same_stream(a, [a[0], torch.ones(1)])
    assert same_stream(None, None) and not same_stream(a, None)


def test_a_damaged_resume_record_is_a_clear_error(tmp_path):
    from lowrank._engine.offload import DiskStore, OffloadedBatches

    store = DiskStore(tmp_path, "float32", torch.device("cpu"))
    record = store.keep([torch.ones(2)]).link(tmp_path / "saved.bin")
    record["entries"][0][2] = "__import__('os')"   # data, never code
    with pytest.raises(lowrank.CompressionError, match="damaged"):
        OffloadedBatches.opened(record, tmp_path, store, torch.device("cpu"))


# -- streamed runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(scalings=["whitening"]),
    dict(inputs="original"),
    dict(scalings=["whitening"], allocator="energy"),
    dict(scalings=["whitening"], corrections=[{"aa-svd": {"epochs": 1, "lr": 1e-3, "progress": False}}]),
], ids=["sequential", "original-inputs", "global-allocator", "reference-stream"])
def test_offloaded_in_float32_equals_in_memory(sources, tmp_path, monkeypatch, options):  # noqa: F811
    from lowrank._engine.offload import OffloadedBatches
    from lowrank._engine.stream import StreamHooks

    recipe = lowrank.Recipe(ratio=0.3, **options)
    model = lowrank.load(sources["llama"])
    lowrank.compress(model, recipe, calibration(), progress=False, batch_size=2)   # several batches
    lowrank.save(model, tmp_path / "memory")
    seen = []
    leave = StreamHooks.leave

    def spy(self, index, phase, inputs):
        seen.append(isinstance(inputs.hidden, OffloadedBatches) and
                    (inputs.reference is None or isinstance(inputs.reference, OffloadedBatches)))
        leave(self, index, phase, inputs)

    monkeypatch.setattr(StreamHooks, "leave", spy)
    report = lowrank.compress_checkpoint(sources["llama"], tmp_path / "stream", recipe, calibration(),
                                         progress=False, batch_size=2, offload="float32")
    assert seen and all(seen)   # the hidden states waited on disk after every block
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert any("offloaded to disk in float32" in n for n in report.notes)
    assert not list(tmp_path.glob(".*lowrank-work"))


def test_offloaded_run_killed_and_resumed_equals_uninterrupted(sources, tmp_path, monkeypatch):  # noqa: F811
    from lowrank._engine.stream import StreamHooks

    recipe = lowrank.Recipe(ratio=0.3, scalings=["whitening"],
                            corrections=[{"aa-svd": {"epochs": 1, "lr": 1e-3, "progress": False}}])
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "whole", recipe, calibration(), progress=False,
                                offload="bfloat16")
    enter = StreamHooks.enter
    monkeypatch.setattr(StreamHooks, "enter", dying_at(enter, 2))
    with pytest.raises(KeyboardInterrupt):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False,
                                    offload="bfloat16")
    work = tmp_path / ".out.lowrank-work"
    assert sorted(p.name for p in work.glob("hidden-*")) == [
        "hidden-2.hidden.bin", "hidden-2.reference.bin", "hidden-2.safetensors"]
    monkeypatch.setattr(StreamHooks, "enter", enter)
    with pytest.raises(lowrank.CompressionError, match="offload setting"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False,
                                    resume=True)
    lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", recipe, calibration(), progress=False,
                                resume=True, offload="bfloat16")
    _same_checkpoint(tmp_path / "whole", tmp_path / "out")
    assert not work.exists()


def test_offloaded_in_bfloat16_stays_close_and_says_so(sources, tmp_path):  # noqa: F811
    recipe = lowrank.Recipe(ratio=0.3, scalings=["whitening"])
    exact = lowrank.compress_checkpoint(sources["llama"], tmp_path / "exact", recipe, calibration(), progress=False)
    rounded = lowrank.compress_checkpoint(sources["llama"], tmp_path / "bf16", recipe, calibration(),
                                          progress=False, offload="bfloat16")
    assert [m.rank for m in rounded.matrices] == [m.rank for m in exact.matrices]
    assert any("bfloat16" in n and "differs slightly" in n for n in rounded.notes)
    ids = calibration(2)
    logits = [lowrank.load(tmp_path / d)(ids).logits for d in ("exact", "bf16")]
    assert not torch.equal(logits[0], logits[1])   # rounded, really
    torch.testing.assert_close(logits[1], logits[0], rtol=0.05, atol=0.05)


def test_a_bad_offload_setting_writes_nothing(sources, tmp_path):  # noqa: F811
    with pytest.raises(lowrank.CompressionError, match="offload: expected one of float32, bfloat16, float16"):
        lowrank.compress_checkpoint(sources["llama"], tmp_path / "out", lowrank.Recipe(ratio=0.3), calibration(),
                                    offload="int8")
    assert list(tmp_path.iterdir()) == []


def test_cli_offload_needs_stream(tmp_path):
    from click.testing import CliRunner

    from lowrank.cli import main

    model = tmp_path / "model"
    build("llama").save_pretrained(model)
    result = CliRunner().invoke(main, ["compress", str(model), "--offload", "bfloat16", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--stream" in result.output
    assert not (tmp_path / "o").exists()
    _word_tokenizer().save_pretrained(model)
    result = CliRunner().invoke(main, ["compress", str(model), "--stream", "--offload", "bfloat16", "--out",
                                       str(tmp_path / "o"), "--calib-windows", "4", "--seqlen", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["offload"] == "bfloat16"
    assert any("offloaded" in n for n in lowrank.load(tmp_path / "o").lowrank_report.notes)


# -- a resumed multi-process run continues with each process's own windows ---------------------------


def _resuming_worker(rank: int, size: int, port: int, source: str, out: str, die_at: int, offload) -> None:
    import datetime

    import torch.distributed as dist

    from lowrank._engine.stream import StreamHooks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    enter = StreamHooks.enter
    dies = dying_at(enter, die_at)
    recipe = lowrank.Recipe(ratio=0.3, scalings=["whitening"])
    try:
        if die_at >= 0:
            StreamHooks.enter = dies
            try:
                lowrank.compress_checkpoint(source, out, recipe, calibration(), progress=False, batch_size=2,
                                            offload=offload)
            except KeyboardInterrupt:
                pass
            StreamHooks.enter = enter
        lowrank.compress_checkpoint(source, out, recipe, calibration(), progress=False, batch_size=2,
                                    offload=offload, resume=die_at >= 0)
    finally:
        StreamHooks.enter = enter
        dist.destroy_process_group()


def _two_processes(*args) -> None:
    import torch.multiprocessing as mp
    from test_stream import _free_port

    args = (2, _free_port(), *args)
    other = mp.get_context("spawn").Process(target=_resuming_worker, args=(1, *args))
    other.start()
    try:
        _resuming_worker(0, *args)
    finally:
        other.join(timeout=180)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0


@pytest.mark.parametrize("offload", [None, "float32"])
def test_two_processes_killed_and_resumed_equal_uninterrupted(sources, tmp_path, offload):  # noqa: F811
    _two_processes(str(sources["llama"]), str(tmp_path / "whole"), -1, offload)
    _two_processes(str(sources["llama"]), str(tmp_path / "out"), 2, offload)
    _same_checkpoint(tmp_path / "whole", tmp_path / "out")
