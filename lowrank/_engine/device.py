"""Where a compression runs, and how long each phase takes there."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .._contract.devices import resolve_device

__all__ = ["resolve_device", "synchronize", "PhaseTimer", "STORAGE_DTYPES"]

#: A recipe's ``dtype`` names (``auto`` keeps each layer's dtype).
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock phase times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseTimer:
    """Seconds per phase of a compression.

    ``forward`` is one pass of the calibration set through the uncompressed blocks (``statistics``
    is the time inside the hooks, taken out of it); ``forward_next`` is the extra pass through each
    compressed block that sequential inputs need; ``forward_reference`` the pass through each
    uncompressed block that carries the original model's hidden states beside them (compensated
    target, corrections that need the reference); ``planning`` is the profiling and gradient work of
    global allocators (``gradients`` the gradient passes alone); ``refinement`` the work of a global
    allocator between its planning stages (zero-sum's projected-gradient correction, SoCo's
    training); ``corrections`` the time in corrections after truncation.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("capture", "forward", "statistics", "factorization", "forward_next", "forward_reference", "planning",
         "gradients", "refinement", "corrections"), 0.0))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` body (GPU work included) to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to ``name``."""
        self.seconds[name] += seconds

    def report(self, total: float) -> dict[str, float]:
        """The phases that took any time, and the total."""
        return {k: v for k, v in {**self.seconds, "total": total}.items() if v or k == "total"}
