"""More than one process on ``torch.distributed`` (launched with ``torchrun``; gloo on CPU, NCCL on GPUs).

Every process holds the model skeleton and walks the same blocks in the same order (the blocks
depend on each other sequentially, so they cannot be split across processes). Within a block:

- the calibration windows are split across the processes (contiguous slices), each runs its own
  windows through the block, and the statistics (Gram matrices, absolute means, token counts) are
  all-reduced, so every process holds the statistics of all windows;
- the block's targeted matrices are split across the processes (round robin), each takes the
  scaled SVDs of its own, and the SVDs are all-gathered, so every process builds the same factors
  from the same decompositions;
- process 0 writes the shards and the resume state; the others wait at a barrier.

The result equals a single-process run up to the order of floating-point sums in the Gram
matrices. Gradient passes (zero-sum's scores, fwsvd's statistics) are not split: the published
zero-sum scores one window, which cannot be divided, so every process runs the gradient pass over
all the gradient windows and process 0's plan is the one applied. Statistics that cannot be
summed across processes (raw ``inputs``, the ``block`` context) and corrections are refused in a
multi-process run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._contract.allocator import Allocator
from .._contract.blocks import BlockInputs
from .._contract.errors import CompressionError
from .._contract.model import weight_of
from .._contract.spectrum import MatrixSpectrum, Selection
from .block_pass import BlockPass, CollectedBlock, MatrixProfile
from .setup import RunSetup

__all__ = ["Ranks", "DistributedBlockPass", "init_from_environment"]


def init_from_environment(device: str | None) -> str | None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): start the process group (NCCL when the run goes to
    CUDA, else gloo) and return this process's device name (``cuda:<LOCAL_RANK>`` for CUDA)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = torch.cuda.is_available() and device in (None, "auto", "cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group (rank 0 of 1 without ``torch.distributed``)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The initialised process group's rank and size, or a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def writer(self) -> bool:
        """Whether this process writes the output (rank 0)."""
        return self.rank == 0

    def split(self, calibration: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the calibration windows."""
        if self.size == 1 or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
            return calibration
        if calibration.shape[0] < self.size:
            raise CompressionError(f"calibration: {calibration.shape[0]} windows cannot be split across "
                                   f"{self.size} processes; use at least one window per process")
        return calibration.tensor_split(self.size)[self.rank]

    def barrier(self) -> None:
        """Wait for every process (nothing in a single process)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def block_pass(self, setup: RunSetup, default: BlockPass) -> BlockPass:
        """The block pass of this run: ``default`` alone, :class:`DistributedBlockPass` in a group."""
        if self.size == 1:
            return default
        needs = setup.needs
        per_window = needs.inputs or needs.block or getattr(needs, "reference", False) or getattr(needs, "cross", False)
        if per_window or setup.recipe.corrections:
            raise CompressionError(
                "a multi-process run sums statistics across processes; this recipe needs per-window "
                "inputs, the block context, the original model's hidden states or corrections, which "
                "are not split yet: run it in one process")
        if needs.gradients or type(setup.recipe.allocator).component_scorer is not Allocator.component_scorer:
            setup.report.notes.append(
                f"the gradient pass ran in each of the {self.size} processes over all its windows (not split)")
        return DistributedBlockPass(setup, self)

    def agreed(self, plan: dict[str, Selection]) -> dict[str, Selection]:
        """Process 0's ``plan`` on every process (``plan`` itself in a single process)."""
        if self.size == 1:
            return plan
        import torch.distributed as dist

        box = [plan if self.writer else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]


class DistributedBlockPass(BlockPass):
    """:class:`BlockPass` with statistics all-reduced and the SVDs of a block split across ranks."""

    def __init__(self, setup: RunSetup, ranks: Ranks) -> None:
        super().__init__(setup)
        self.ranks = ranks

    def collect(self, block: nn.Module, index: int, inputs: BlockInputs, keep_outputs: bool,
                **options: Any) -> CollectedBlock:
        """Statistics of this process's windows, then summed over every process."""
        import torch.distributed as dist

        collected = super().collect(block, index, inputs, keep_outputs, **options)
        with self.setup.timer.phase("statistics"):
            for _, acc in sorted(collected.collector._acc.items()):
                dist.all_reduce(acc.gram)
                if acc.abs_sum is not None:
                    dist.all_reduce(acc.abs_sum)
                count = torch.tensor([acc.n_tokens], dtype=torch.int64, device=acc.gram.device)
                dist.all_reduce(count)
                acc.n_tokens = int(count.item())
        return collected

    def profile(self, block: nn.Module, index: int, inputs: BlockInputs, collected: CollectedBlock,
                plan: dict[str, Selection] | None) -> list[MatrixProfile]:
        """Each process's share of the scaled SVDs, all-gathered (in model order)."""
        import torch.distributed as dist

        setup = self.setup
        targets = setup.targets_of(index)
        mine = [t for k, t in enumerate(targets) if k % self.ranks.size == self.ranks.rank]
        own = BlockPass(dataclasses.replace(setup, targets=mine)).profile(block, index, inputs, collected, plan)
        gathered: list[Any] = [None] * self.ranks.size
        with setup.timer.phase("factorization"):
            dist.all_gather_object(gathered, {p.target.name: p.svd.to("cpu") for p in own})
        svds = {name: svd for part in gathered for name, svd in part.items()}
        local = {p.target.name: p for p in own}
        profiles = []
        for t in targets:
            if t.name in local:
                profiles.append(local[t.name])
                continue
            svd = svds[t.name].to(setup.device)
            weight = weight_of(block.get_submodule(t.local)).detach().to(setup.device, torch.float64)
            stats = self._stats_for(t, block, index, inputs, collected)
            profiles.append(MatrixProfile(t, svd, stats, weight, MatrixSpectrum(t.name, t.shape, svd.s, None, index)))
        return profiles
