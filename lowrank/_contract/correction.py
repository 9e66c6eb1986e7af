"""The correction base: change a block's factors after truncation, before the next block runs.

Corrections are the fourth registered kind (hook ``lowrank_register_corrections``). They run once
per decoder block, after its targeted layers were replaced by their factors, with the block's
calibration inputs and the uncompressed block's outputs at hand; they may change the factors of
that block only (e.g. train them to reproduce the original block's outputs, AA-SVD). A recipe
lists any number of them; they run in order.

A correction that needs the whole model between planning stages of a global allocator is not a
``Correction``: it is the allocator's own ``stages`` / ``refine`` (ZS-SVD's projected-gradient
step), because it changes what the next stage plans.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .blocks import BlockInputs, run_block
from .layers import LowRankLinear
from .model import Target
from .strategy import Strategy

__all__ = ["Correction", "BlockCorrectionContext"]


@dataclass
class BlockCorrectionContext:
    """One compressed block, as a correction receives it.

    Attributes:
        block: The decoder block, its targeted layers already replaced (on the compute device).
        index: The block's index.
        targets: The block's targeted layers.
        factored: The ``LowRankLinear`` of every target that was factored, by full name.
        inputs: The calibration inputs the block was compressed on.
        original_outputs: The uncompressed block's outputs on ``inputs``, one tensor per batch.
        reference_inputs: The uncompressed model's hidden states entering this block, one tensor
            per batch (the same tensors as ``inputs.hidden`` with ``inputs: original``). Filled
            when a correction of the recipe sets ``needs_reference``; None otherwise.
        reference_outputs: The uncompressed block's outputs on ``reference_inputs``: where the
            original model's hidden states go next (the "anchored" target of AA-SVD).
        device: Where work should run.
        seed: The recipe's seed (a correction that samples seeds from it).
        notes: Lines for the report.
    """

    block: nn.Module
    index: int
    targets: list[Target]
    factored: dict[str, LowRankLinear]
    inputs: BlockInputs
    original_outputs: Sequence[torch.Tensor]
    device: torch.device
    reference_inputs: Sequence[torch.Tensor] | None = None
    reference_outputs: Sequence[torch.Tensor] | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """The (compressed) block's output on ``hidden``, a batch shaped like the calibration ones."""
        args, kwargs = self.inputs.args_for(self.index, hidden)
        return run_block(self.block, hidden, args, kwargs)


class Correction(Strategy):
    """Changes a compressed block's factors so that the block behaves more like the original."""

    kind: ClassVar[str] = "correction"
    #: Set when ``correct`` reads ``reference_inputs`` / ``reference_outputs``: with sequential
    #: inputs the engine then also carries the uncompressed model's hidden states from block to
    #: block (one more forward pass of the dense block per block, and one more set of hidden states).
    #: A subclass whose need depends on its settings overrides it with a property (``aa-svd``).
    needs_reference: ClassVar[bool] = False

    @abstractmethod
    def correct(self, context: BlockCorrectionContext) -> None:
        """Update ``context.factored`` in place (parameters ``A``, ``B``, ``bias``); never grow a
        rank. Errors must leave the block as it was."""
