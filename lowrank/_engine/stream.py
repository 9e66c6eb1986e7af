"""``lowrank.compress_checkpoint``: compress a checkpoint on disk without loading it whole.

The model is built on the meta device; the embeddings, the final norm and the head are read from
the safetensors shards, and each decoder block only when a pass reaches it. After the compression
pass is done with a block, its factors and dense leftovers go to a shard of their own and the
block goes back to the meta device. Peak host memory is the embeddings and head, one block and
the calibration hidden states, whatever the number of blocks. The run is the in-memory one
(:func:`lowrank.compress`'s ``_CompressionPass``) with :class:`StreamHooks` around each block, so
the factors are the same bit for bit.

Passes over the blocks (each reads every block from disk once): a ``matrix`` allocator one; a
``global`` allocator one more, the planning pass, before it; a gradient pass (zero-sum's scores,
fwsvd's statistics) two more, forward and backward, one block at a time
(``_engine/gradients_blockwise.py``). Strategies that need the whole model at once in another way
(a loss over the model: sensitivity; a refinement between planning stages: multi-stage
zero-sum, soco) are refused with a clear error.

Everything is written into a work directory (``_engine/resume.py``) that becomes the output,
renamed, only when the run has finished; after a crash ``resume=True`` continues from the last
finished block.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._contract.blocks import BlockInputs
from .._contract.errors import CompressionError
from .._contract.exporter import Exporter, check_output_directory
from .._contract.layers import LowRankLinear
from .._contract.model import count_parameters, set_submodule, weight_of
from .._contract.recipe import Recipe
from .._contract.registry import get_registry
from .._contract.report import CompressionReport
from .._contract.spectrum import Selection
from .compress import _check_arguments, _CompressionPass, _finish_report
from .device import STORAGE_DTYPES
from .distributed import Ranks, init_from_environment
from .gradients import reset_gpu_peak
from .guard import Undo
from .hooks import BlockHooks
from .offload import DiskStore, check_offload
from .resume import RunState, WorkDir, fingerprint
from .setup import RunSetup
from .weights import (
    ShardReader,
    build_skeleton,
    check_tensors,
    free_block,
    load_tensors,
    non_block_state,
    read_source_config,
    release_freed_memory,
    shard_name,
    write_shard,
)

__all__ = ["compress_checkpoint", "StreamHooks"]

_TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class StreamHooks(BlockHooks):
    """Read a block before each pass reaches it; after the compression pass, write and free it."""

    streams_blocks = True

    def __init__(self, setup: RunSetup, reader: ShardReader, work: WorkDir, state: RunState, undo: Undo,
                 ranks: Ranks) -> None:
        self.setup, self.reader, self.work, self.state, self.undo, self.ranks = setup, reader, work, state, undo, ranks
        self.count = len(setup.blocks) + 1  # one shard per block, one for the rest
        for phase in ("read", "write"):  # the disk's share of the time
            setup.timer.seconds.setdefault(phase, 0.0)

    def start(self, inputs: BlockInputs) -> int:
        """Resume: the finished blocks become (meta) factored layers, the saved hidden states return."""
        done = self.state.done
        if done:
            saved = CompressionReport.from_dict(self.state.report or {})
            self.setup.report.matrices, self.setup.report.notes = saved.matrices, saved.notes
            for m in saved.matrices:
                if m.block < done and m.rank is not None:
                    self._placeholder(m.name, m.rank)
            self.work.load_hidden(done, inputs, self.setup.device, self.setup.store)
        return done

    def _placeholder(self, name: str, rank: int) -> None:
        module = self.setup.model.get_submodule(name)
        policy = self.setup.recipe.dtype
        dtype = weight_of(module).dtype if policy == "auto" else STORAGE_DTYPES[policy]
        out_features, in_features = weight_of(module).shape
        set_submodule(self.setup.model, name, LowRankLinear(
            int(in_features), int(out_features), rank, bias=getattr(module, "bias", None) is not None,
            device="meta", dtype=dtype))

    def saved_plan(self) -> dict[str, Selection] | None:
        """The plan of an interrupted run."""
        return self.state.plan_selections()

    def planned(self, plan: dict[str, Selection]) -> dict[str, Selection]:
        """Save the plan (a resumed run does not plan again); every process applies process 0's."""
        plan = self.ranks.agreed(plan)   # they score the same windows: theirs too, up to summation order
        self.state.plan = RunState.plan_record(plan)
        if self.ranks.writer:
            self.work.commit(self.state)
        return plan

    def enter(self, index: int, phase: str) -> None:
        """Read block ``index``'s weights from the shards."""
        with self.setup.timer.phase("read"):
            load_tensors(self.setup.blocks[index], self.reader, f"{self.setup.prefix}.{index}.")

    def leave(self, index: int, phase: str, inputs: BlockInputs) -> None:
        """After compression: write the block's shard and the resume state; then free the block."""
        block = self.setup.blocks[index]
        if phase == "compressing":
            with self.setup.timer.phase("write"):
                self._commit(index, block, inputs)
        free_block(block)
        self.undo.swaps.clear()  # the replaced layers: nothing to restore in a streamed run
        release_freed_memory()

    def _commit(self, index: int, block: nn.Module, inputs: BlockInputs) -> None:
        name = shard_name(index + 2, self.count)
        tensors = {f"{self.setup.prefix}.{index}.{k}": v for k, v in block.state_dict().items()}
        self.state.weight_map.update(dict.fromkeys(tensors, name))
        self.state.done = index + 1
        self.state.report = self.setup.report.to_dict()
        if self.ranks.writer:
            write_shard(self.work.shards / name, tensors)
        self.work.save_hidden(index + 1, inputs)   # every process its own share of the windows
        self.ranks.barrier()
        if self.ranks.writer:
            self.work.commit(self.state)
        self.ranks.barrier()
        self.work.drop_hidden(index + 1)


def _exporter(recipe: Recipe) -> Exporter:
    exporter = recipe.exporter or get_registry().default("exporter")
    if not isinstance(exporter, Exporter):
        exporter = get_registry().get("exporter", exporter)()
    if type(exporter).finish_streamed is Exporter.finish_streamed:
        raise CompressionError(f"exporter {exporter.name!r} cannot write a streamed checkpoint; use exporter 'hf'")
    return exporter


def _check_streamable(recipe: Recipe, offload: str | None) -> None:
    check_offload(offload)
    allocator = recipe.allocator
    if allocator.needs_whole_model:
        raise CompressionError(
            f"allocator {allocator.name!r} needs the whole model at once (a loss over the calibration "
            "windows), which a streamed run does not hold; compress in memory with lowrank.compress, or "
            "choose an allocator that streams (uniform, energy, loss-aware, zero-sum with one stage)")
    if allocator.stages > 1:
        raise CompressionError(
            f"allocator {allocator.name!r} plans in {allocator.stages} stages, and between two stages it "
            "changes weights across the whole model, which a streamed run (one block at a time) cannot "
            "do; use one stage (e.g. zero-sum with stages: 1) or compress in memory")


def _meta_guard(module: nn.Module, args: Any) -> None:
    if next(module.parameters()).device.type == "meta":
        raise CompressionError(
            "a strategy of this recipe needs the whole model at once (a loss over the model, e.g. the "
            "sensitivity allocator), which a streamed run does not hold; compress in "
            "memory with lowrank.compress")


def _open_model(source: Path, dtype: Any) -> tuple[nn.Module, ShardReader, str]:
    """The skeleton with everything outside the blocks read; the reader; the blocks' prefix."""
    from .discovery import find_blocks

    config = read_source_config(source)
    reader = ShardReader(source)
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
    dtype = dtype if dtype is not None else (saved if isinstance(saved, torch.dtype) else torch.float32)
    model = build_skeleton(config, dtype)
    prefix, blocks = find_blocks(model)
    for index, block in enumerate(blocks):  # every block's tensors are there: fail now, not at block 60
        check_tensors(block, reader, f"{prefix}.{index}.")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    load_tensors(model, reader, "", skip=(f"{prefix}.",), optional=tied)
    model.tie_weights()
    return model, reader, prefix


def _copy_tokenizer(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in _TOKENIZER_FILES):
            shutil.copy2(path, target / path.name)


def _start(source: Path, target: Path, recipe: Recipe, calibration: torch.Tensor, batch_size: int, progress: bool,
           dtype: Any, resume: bool, work_dir: str | os.PathLike[str] | None, offload: str | None) -> StreamHooks:
    """Open the model, join the process group, check and set up the run, open (or reopen) the work
    directory, write the shard of everything outside the blocks; the hooks that hold it all."""
    model, reader, prefix = _open_model(source, dtype)
    device = init_from_environment(recipe.device)  # under torchrun: the process group, this rank's device
    ranks = Ranks.current()
    key = fingerprint(str(source.resolve()), recipe.to_yaml(), calibration, str(model.dtype), batch_size, ranks.size,
                      offload)
    torch.manual_seed(recipe.seed)
    run_recipe = recipe if device == recipe.device else dataclasses.replace(recipe, device=device)
    setup = RunSetup.create(model, run_recipe, ranks.split(calibration), batch_size, progress and ranks.writer, None)
    setup.all_calibration = calibration if ranks.size > 1 else None   # gradient passes are not split
    setup.report.model_params_before = count_parameters(model)
    work = WorkDir(target, Path(work_dir) if work_dir is not None else None,
                   tag=f"-rank{ranks.rank}" if ranks.size > 1 else "")
    state = work.begin(key, resume) if ranks.writer else RunState(key)
    ranks.barrier()
    if resume and not ranks.writer:
        state = work.begin(key, resume)
    if offload is not None:
        setup.store = store = DiskStore(work.path / "offload", offload, setup.device)
        setup.report.notes.append(store.note)
    first_shard = shard_name(1, len(setup.blocks) + 1)
    rest = non_block_state(model, f"{prefix}.")
    state.weight_map.update(dict.fromkeys(rest, first_shard))
    if ranks.writer and not (work.shards / first_shard).is_file():
        write_shard(work.shards / first_shard, rest)
    hooks = StreamHooks(setup, reader, work, state, Undo(model), ranks)
    setup.hooks = hooks
    return hooks


def compress_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str], recipe: Recipe | None = None,
                        calibration: torch.Tensor | None = None, *, batch_size: int = 8, progress: bool = True,
                        dtype: torch.dtype | None = None, tokenizer: Any = None, resume: bool = False,
                        work_dir: str | os.PathLike[str] | None = None, offload: str | None = None) -> CompressionReport:
    """Compress the safetensors checkpoint in ``source`` into ``out`` without loading it whole.

    Each block is read from the shards when a pass reaches it and written to a shard of its own once
    compressed: memory does not grow with the blocks. The result equals ``lowrank.compress`` and
    ``lowrank.save`` (``hf``). Under ``torchrun`` the windows and SVDs are split. See "Large models".

    Args:
        source: A checkpoint directory (``config.json`` and safetensors weights).
        out: The output directory, new or empty; it appears only when the run has finished.
        recipe: What to do (default: the registered defaults at ratio 0.2).
        calibration: Token ids, a (windows x tokens) integer tensor.
        batch_size: Windows per forward pass.
        progress: Show progress bars and a line per block.
        dtype: The dtype to compute in (default: the checkpoint's).
        tokenizer: Saved beside the weights; by default the source's tokenizer files are copied.
        resume: Continue the interrupted run of the same arguments from its last finished block.
        work_dir: Where the run keeps its state (default: ``.<out name>.lowrank-work`` beside ``out``).
        offload: Keep the calibration hidden states in the work directory, not in memory, as
            ``"bfloat16"``, ``"float16"`` or ``"float32"`` (exact: the same checkpoint as without).

    Returns:
        The report (also written to ``out/lowrank_report.json``).

    Raises:
        CompressionError: Bad input (nothing is written), or a recipe that needs the whole model.
    """
    recipe = recipe if recipe is not None else Recipe()
    _check_arguments(recipe, calibration, batch_size)
    _check_streamable(recipe, offload)
    source, target = Path(source), check_output_directory(out)
    exporter = _exporter(recipe)
    started = time.perf_counter()
    hooks = _start(source, target, recipe, calibration, batch_size, progress, dtype, resume, work_dir, offload)  # type: ignore[arg-type]
    setup, work, ranks = hooks.setup, hooks.work, hooks.ranks
    guards = [b.register_forward_pre_hook(_meta_guard) for b in setup.blocks]
    reset_gpu_peak(setup.device)
    try:
        compression = _CompressionPass(setup)
        compression.block_pass = ranks.block_pass(setup, compression.block_pass)
        compression.run(hooks.undo)
        report = _finish_report(setup.model, setup, recipe, time.perf_counter() - started)
        if ranks.writer:
            exporter.finish_streamed(setup.model, work.shards, hooks.state.weight_map, tokenizer=tokenizer,
                                     recipe=recipe, report=report)
            if tokenizer is None:
                _copy_tokenizer(source, work.shards)
            work.finish()
        ranks.barrier()
    except BaseException:
        if ranks.writer and hooks.state.done == 0 and hooks.state.plan is None:
            shutil.rmtree(work.path, ignore_errors=True)  # nothing worth resuming
        raise
    finally:
        for g in guards:
            g.remove()
    return report
