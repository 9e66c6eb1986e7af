"""AA-SVD: train a compressed block's factors so that the block reproduces the original's outputs.

After a block's layers were truncated (by any scaling and allocator), every factor pair (A, B) of
its ``LowRankLinear`` layers trains jointly, everything else frozen (layers left dense, norms,
biases unless ``train_bias``), to minimise the mean squared error between the compressed block's
outputs and a target (AA-SVD, arXiv 2604.02119; code ``atulkumarin/AA-SVD``).

Which inputs and which target (the objective variants):

- ``inputs: compressed`` (default) trains on ``context.inputs.hidden``: with the recipe's
  ``inputs: sequential`` these are the compressed model's hidden states, so the block learns to
  undo the error of the blocks before it. ``inputs: original`` trains on the uncompressed model's
  hidden states (``context.reference_inputs``).
- ``target: original`` (default, "anchored") is where the uncompressed model's hidden states go
  next (``context.reference_outputs``); ``target: same-inputs`` is the dense block's output on the
  training inputs (``context.original_outputs``). With ``inputs: original`` both are the same.

The published setting (AdamW, lr 1e-4, weight decay 0.01, 25 epochs, 10 % linear warm-up then a
cosine to 0.1 x lr, gradient clipping at 1, batches of 32 sequences, all calibration data) is the
default on CUDA. On other devices the default is the CPU-sized schedule ``CPU_EPOCHS`` epochs at
``CPU_LR``, one calibration batch per step, which finishes SmolLM2-135M with 16-32 windows of 512 in
minutes. The factors train in float32 and are cast back to their storage dtype; the error on the
calibration batches never ends above its start (see ``block_training_loop``).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field

import lowrank

from .block_training_loop import Schedule, TrainResult, batch_errors, split_batches, train_block

__all__ = ["AASVD", "AASVDConfig", "CPU_EPOCHS", "CPU_LR", "PUBLISHED", "STRATEGIES"]

#: The published schedule (AA-SVD's code): epochs, lr, sequences per step.
PUBLISHED = {"epochs": 25, "lr": 1e-4, "batch_size": 32}
#: The CPU-sized default (measured on SmolLM2-135M, 16 windows of 512; see docs/aa-svd.md).
CPU_EPOCHS, CPU_LR = 2, 1e-3


@lowrank.strategy_config
class AASVDConfig:
    """Settings of ``aa-svd``; a setting left ``null`` takes the published value on CUDA and the
    CPU-sized one elsewhere."""

    inputs: Literal["compressed", "original"] = Field(
        "compressed", description="train on the block's own calibration inputs (compressed) or the "
                                  "uncompressed model's hidden states (original)")
    target: Literal["original", "same-inputs"] = Field(
        "original", description="the uncompressed model's next hidden states (anchored) or the dense "
                                "block's output on the training inputs")
    epochs: int | None = Field(None, ge=1, le=10_000, description="passes over the calibration batches "
                                                                 "(published 25)")
    lr: float | None = Field(None, gt=0.0, le=100.0, description="peak AdamW learning rate (published 1e-4)")
    batch_size: int | None = Field(
        None, ge=1, description="sequences per optimizer step, rounded to whole calibration batches "
                                "(published 32; null on CPU: one calibration batch)")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the steps with a linear warm-up")
    min_lr: float = Field(0.1, ge=0.0, le=1.0, description="the cosine ends at min_lr x lr")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after the warm-up")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    clip_norm: float | None = Field(1.0, gt=0.0, description="gradient-norm clipping (null: none)")
    train_bias: bool = Field(False, description="also train the factored layers' biases")
    holdout: float = Field(0.0, ge=0.0, le=0.5, description="fraction of the calibration batches held "
                                                          "out to choose the kept epoch and stop early")
    patience: int = Field(2, ge=1, description="epochs without a better held-out error before stopping")
    progress: bool = Field(True, description="a progress bar per block (on a terminal)")


class AASVD(lowrank.Correction):
    """AA-SVD: train every factor pair of a block jointly to reproduce the original block's outputs."""

    name = "aa-svd"
    Config = AASVDConfig

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        """Only the variants that read the original model's stream make the engine carry it."""
        return self.config.inputs == "original" or self.config.target == "original"

    def schedule(self, context: lowrank.BlockCorrectionContext, sequences_per_batch: int) -> Schedule:
        """The training schedule on ``context.device``: the settings, nulls filled by the device."""
        c = self.config
        gpu = context.device.type == "cuda"
        epochs = c.epochs if c.epochs is not None else (PUBLISHED["epochs"] if gpu else CPU_EPOCHS)
        lr = c.lr if c.lr is not None else (PUBLISHED["lr"] if gpu else CPU_LR)
        size = c.batch_size if c.batch_size is not None else (PUBLISHED["batch_size"] if gpu else sequences_per_batch)
        group = max(1, round(size / max(1, sequences_per_batch)))
        return Schedule(epochs=epochs, lr=lr, group=group, warmup=c.warmup, floor=c.min_lr,
                        cosine=c.schedule == "cosine", weight_decay=c.weight_decay, clip=c.clip_norm,
                        patience=c.patience)

    def pairs(self, context: lowrank.BlockCorrectionContext) -> tuple[list, list[str]]:
        """The (inputs, target) of every calibration batch, and notes on any fallback."""
        hidden, dense = list(context.inputs.hidden), list(context.original_outputs)
        ref_in, ref_out = context.reference_inputs, context.reference_outputs
        notes = []
        if self.config.inputs == "original" or self.config.target == "original":
            if ref_in is None or ref_out is None:
                # the engine carries no separate reference stream (e.g. ``inputs: original``, where
                # it is the block's own inputs): the block's inputs and dense outputs stand in
                notes.append("no reference stream from the engine; the block's own inputs and the dense "
                             "block's outputs on them used")
                ref_in, ref_out = hidden, dense
        if self.config.inputs == "original":
            xs, ys = list(ref_in), list(ref_out)
        else:
            xs, ys = hidden, (list(ref_out) if self.config.target == "original" else dense)
        if len(xs) != len(ys):
            raise lowrank.CompressionError(f"aa-svd: {len(xs)} input batches but {len(ys)} target batches")
        return list(zip(xs, ys)), notes

    def correct(self, context: lowrank.BlockCorrectionContext) -> None:
        """Train the block's factors in place; the block is left as it was on any error."""
        if not context.factored:  # every matrix of the block left dense: nothing to train
            return
        if not context.original_outputs:
            context.notes.append(f"aa-svd block {context.index}: no outputs of the original block; "
                                 "nothing trained")
            return
        pairs, notes = self.pairs(context)
        layers = list(context.factored.values())
        params = [p for m in layers for p in (m.A, m.B)]
        if self.config.train_bias:
            params += [m.bias for m in layers if m.bias is not None]
        started = time.perf_counter()
        result, schedule = _train(self, context, pairs, params)
        context.notes.append(_note(context.index, result, schedule, time.perf_counter() - started, notes))


def _train(strategy: AASVD, context: lowrank.BlockCorrectionContext, pairs: list,
           params: list[torch.nn.Parameter]) -> tuple[TrainResult, Schedule]:
    """Long because it owns every change to the block: float32 copies of the factors, frozen
    parameters, the progress bar, and putting everything back (the trained values, or the start
    on any error)."""
    block = context.block
    schedule = strategy.schedule(context, pairs[0][1].shape[0])
    generator = torch.Generator().manual_seed((context.seed * 1_000_003 + context.index) % 2**63)
    train, held = split_batches(len(pairs), strategy.config.holdout, generator)
    dtypes = [p.dtype for p in params]
    flags = {id(p): p.requires_grad for p in block.parameters()}
    start = [p.detach().clone() for p in params]
    # factors stored in a narrower dtype: the guarantee is checked again in that dtype at the end
    native = _mse(context.run, pairs) if any(d != torch.float32 for d in dtypes) else None
    bar = _bar(strategy, context, schedule.epochs * math.ceil(len(train) / schedule.group))
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.data = p.data.float()  # float32 master copies; cast back below
            p.requires_grad_(True)
        with torch.enable_grad():
            result = train_block(context.run, params, pairs, train, held, schedule, generator, bar)
        for p, dtype in zip(params, dtypes):
            p.data = p.data.to(dtype)
        if native is not None and result.kept_epoch and _mse(context.run, pairs) > native:
            # rounding back to the storage dtype lost the gain: the start is kept
            for p, value in zip(params, start):
                p.data = value
            result.kept_epoch, result.end = 0, result.start
    except BaseException:
        for p, value in zip(params, start):
            p.data = value
        raise
    finally:
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
            p.grad = None
        if bar is not None:
            bar.close()
    return result, schedule


def _mse(run, pairs: list) -> float:
    errors = batch_errors(run, pairs)
    return sum(e for e, _ in errors) / max(1, sum(n for _, n in errors))


def _bar(strategy: AASVD, context: lowrank.BlockCorrectionContext, total: int):
    """A tqdm bar over the block's steps, shown on a terminal only (None when progress is off)."""
    if not strategy.config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"aa-svd block {context.index}", leave=False, disable=None)


def _note(index: int, r: TrainResult, schedule: Schedule, seconds: float, notes: list[str]) -> str:
    """The report line of one block: the error before and after, the steps and the time."""
    change = (r.end / r.start - 1.0) if r.start > 0 else 0.0
    line = (f"aa-svd block {index}: output MSE {r.start:.4g} -> {r.end:.4g} ({change:+.1%}), "
            f"{r.steps} steps in {r.epochs} epochs (lr {schedule.lr:g}, {schedule.group} batch(es)/step), "
            f"{seconds:.1f}s")
    if r.held_start is not None:
        line += f"; held-out {r.held_start:.4g} -> {r.held_end:.4g}"
    if r.diverged:
        line += "; diverged (non-finite loss)"
    if r.kept_epoch == 0:
        line += "; start kept (training did not lower the error)"
    elif r.kept_epoch < r.epochs:
        line += f"; epoch {r.kept_epoch} kept"
    return line + "".join(f"; {n}" for n in notes)


STRATEGIES = [AASVD]
