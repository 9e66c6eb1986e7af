"""Accumulating the calibration statistics of a block's targeted layers through forward hooks."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ._scaling import LayerStats

__all__ = ["StatsCollector"]


@dataclass
class _Accumulator:
    gram: torch.Tensor
    abs_sum: torch.Tensor | None
    n_tokens: int = 0


@dataclass
class StatsCollector:
    """Forward hooks that add each targeted layer's inputs into float32 sums.

    Only one block's statistics exist at a time: the pipeline builds a collector per block.
    """

    want_abs_mean: bool = False
    seconds: float = 0.0
    _acc: dict[str, _Accumulator] = field(default_factory=dict)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            start = time.perf_counter()
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            acc = self._acc.get(name)
            if acc is None:
                n = x.shape[1]
                acc = _Accumulator(
                    torch.zeros(n, n, dtype=torch.float32, device=x.device),
                    torch.zeros(n, dtype=torch.float32, device=x.device) if self.want_abs_mean else None,
                )
                self._acc[name] = acc
            acc.gram.addmm_(x.T, x)
            if acc.abs_sum is not None:
                acc.abs_sum.add_(x.abs().sum(0))
            acc.n_tokens += x.shape[0]
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.seconds += time.perf_counter() - start

        return hook

    @contextmanager
    def attached(self, modules: dict[str, nn.Module]) -> Iterator["StatsCollector"]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def stats(self, name: str) -> LayerStats:
        """The layer's statistics in float64 (the factorization precision)."""
        acc = self._acc[name]
        gram = acc.gram.to(torch.float64)
        abs_mean = None if acc.abs_sum is None else acc.abs_sum.to(torch.float64) / max(acc.n_tokens, 1)
        return LayerStats(0.5 * (gram + gram.T), acc.n_tokens, abs_mean)

    def drop(self, name: str) -> None:
        self._acc.pop(name, None)
