"""The training maths of block-level factor training (``aa-svd``): loss, schedule, the loop.

The objective is the mean squared error between the compressed block's outputs and a target, over
calibration batches ``pairs[i] = (x_i, y_i)``:

    L = sum_i ||f(x_i) - y_i||_F^2 / sum_i numel(y_i)

minimised over the factors only (everything else in the block is frozen), by AdamW with a linear
warm-up and a cosine decay to a floor (the published AA-SVD schedule), gradient clipping, and one
optimizer step per group of calibration batches (gradients accumulated over the group, so a step
sees ``group`` batches whatever the engine's batch size).

The loop never returns a state worse than its start: the error on every calibration batch is
measured before training and after every epoch, the best state is kept (by the held-out batches'
error when some are held out, else by all of them), and the start is restored when the kept state
is not below it on all calibration batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["Schedule", "TrainResult", "batch_errors", "lr_factor", "train_block", "snapshot", "restore",
           "split_batches"]

Pair = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """How the factors are trained.

    Attributes:
        epochs: Passes over the training batches.
        lr: Peak learning rate of AdamW.
        group: Calibration batches per optimizer step (gradients accumulated over them).
        warmup: Fraction of the steps with a linear warm-up.
        floor: The cosine decays from ``lr`` to ``floor * lr``.
        cosine: False keeps ``lr`` constant after the warm-up.
        weight_decay: AdamW's decoupled weight decay.
        clip: Largest gradient norm over all trained parameters (None: no clipping).
        patience: Epochs without a better held-out error before stopping (held-out batches only).
    """

    epochs: int
    lr: float
    group: int = 1
    warmup: float = 0.1
    floor: float = 0.1
    cosine: bool = True
    weight_decay: float = 0.01
    clip: float | None = 1.0
    patience: int = 2


@dataclass
class TrainResult:
    """What one block's training did.

    Attributes:
        start: The mean squared error on all calibration batches before training.
        end: The same after training (never above ``start``).
        steps: Optimizer steps taken.
        epochs: Epochs run (fewer than scheduled after early stopping or divergence).
        kept_epoch: The epoch whose state was kept (0: the start, restored).
        held_start: The held-out batches' error before training (None without held-out batches).
        held_end: The held-out batches' error of the kept state.
        diverged: A step produced a non-finite loss; training stopped there.
    """

    start: float
    end: float
    steps: int
    epochs: int
    kept_epoch: int
    held_start: float | None = None
    held_end: float | None = None
    diverged: bool = False


def snapshot(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Copies of the parameters' values (the state to come back to)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Put ``values`` back into ``params``, in the parameters' current dtype."""
    for p, v in zip(params, values):
        p.copy_(v.to(p.dtype))


@torch.no_grad()
def batch_errors(run: Runner, pairs: Sequence[Pair]) -> list[tuple[float, int]]:
    """(sum of squared errors, element count) per calibration batch, accumulated in float64."""
    out = []
    for x, y in pairs:
        diff = run(x).double() - y.double()
        out.append((float(diff.pow(2).sum()), y.numel()))
    return out


def _mse(errors: Sequence[tuple[float, int]], which: Sequence[int] | None = None) -> float:
    chosen = [errors[i] for i in which] if which is not None else errors
    count = sum(n for _, n in chosen)
    return sum(e for e, _ in chosen) / count if count else 0.0


def lr_factor(step: int, total: int, warmup: float, floor: float, cosine: bool) -> float:
    """The learning-rate multiplier of step ``step`` (0-based) out of ``total``: a linear warm-up
    over the first ``warmup`` fraction of the steps, then a cosine from 1 down to ``floor``."""
    ramp = int(warmup * total)
    if step < ramp:
        return (step + 1) / ramp
    if not cosine or total - ramp <= 1:
        return 1.0
    progress = (step - ramp) / (total - ramp - 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_batches(count: int, holdout: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(training, held-out) batch indices: ``round(holdout * count)`` batches held out at random,
    at least one when ``holdout > 0`` and never all of them."""
    order = torch.randperm(count, generator=generator).tolist()
    held = min(max(1, round(holdout * count)), count - 1) if holdout > 0 and count > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def _step(run: Runner, params: list[torch.nn.Parameter], pairs: Sequence[Pair], chunk: list[int],
          optimizer: torch.optim.Optimizer, clip: float | None) -> float:
    """One optimizer step on the batches ``chunk`` (gradients accumulated); returns the loss."""
    count = sum(pairs[i][1].numel() for i in chunk)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in chunk:
        x, y = pairs[i]
        loss = (run(x).float() - y.float()).pow(2).sum() / count
        loss.backward()
        total += float(loss.detach())
    if not math.isfinite(total):
        return total
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return total


def _epoch(run: Runner, params: list[torch.nn.Parameter], pairs: Sequence[Pair], order: list[int],
           optimizer: torch.optim.Optimizer, schedule: Schedule, first: int, total: int, bar) -> tuple[int, bool]:
    """One pass over ``order`` in steps of ``schedule.group`` batches, counting steps from
    ``first``; returns (steps taken, diverged)."""
    steps = 0
    for s in range(0, len(order), schedule.group):
        factor = lr_factor(first + steps, total, schedule.warmup, schedule.floor, schedule.cosine)
        for g in optimizer.param_groups:
            g["lr"] = schedule.lr * factor
        loss = _step(run, params, pairs, order[s:s + schedule.group], optimizer, schedule.clip)
        steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mse=f"{loss:.3g}", refresh=False)
        if not math.isfinite(loss):
            return steps, True
    return steps, False


def train_block(run: Runner, params: list[torch.nn.Parameter], pairs: Sequence[Pair],
                train: Sequence[int], held: Sequence[int], schedule: Schedule,
                generator: torch.Generator, bar=None) -> TrainResult:
    """Train ``params`` (float32, ``requires_grad``) so that ``run(x_i)`` approaches ``y_i``.

    ``train`` and ``held`` index ``pairs``; the batch order of every epoch is drawn from
    ``generator``. ``bar`` (a tqdm bar or None) advances once per step. On return the parameters
    hold the kept state, whose error on all calibration batches is at most the start's.
    """
    errors = batch_errors(run, pairs)
    result = TrainResult(_mse(errors), _mse(errors), 0, 0, 0, *([_mse(errors, held)] * 2 if held else [None, None]))
    initial = snapshot(params)
    best, best_key = initial, (result.held_start if held else result.start)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    total, stale = schedule.epochs * math.ceil(len(train) / schedule.group), 0
    for epoch in range(1, schedule.epochs + 1):
        result.epochs = epoch
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        steps, result.diverged = _epoch(run, params, pairs, order, optimizer, schedule, result.steps, total, bar)
        result.steps += steps
        if result.diverged:
            break
        errors = batch_errors(run, pairs)
        key = _mse(errors, held) if held else _mse(errors)
        if math.isfinite(key) and key < best_key:
            best, best_key, stale = snapshot(params), key, 0
            result.kept_epoch, result.end = epoch, _mse(errors)
            result.held_end = key if held else None
        else:
            stale += 1
            if held and stale >= schedule.patience:
                break
    if result.kept_epoch and not result.end < result.start:
        # chosen on the held-out batches but not better on all of them: the start is kept
        best, result.kept_epoch, result.end, result.held_end = initial, 0, result.start, result.held_start
    restore(params, best)
    return result
