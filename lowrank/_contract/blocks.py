"""What a decoder block receives, and a handle to run one block on its calibration inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockInputs", "BlockContext", "run_block"]


@dataclass
class BlockInputs:
    """Hidden states for every calibration batch and the extra arguments of every block.

    Attributes:
        hidden: One hidden-state tensor per calibration batch, entering the current block: a list,
            or a read-only sequence that reads each batch from disk when indexed (a streamed run
            with ``offload``); index it or iterate it, ``list()`` it only to hold them all.
        extra: ``extra[shape][i]`` holds block i's (args, kwargs) for batches of that shape; masks
            and rotary tables depend only on the batch shape when there is no padding.
        reference: The uncompressed model's hidden states entering the current block, when the run
            carries them beside the compressed ones (sequential inputs with a compensated target
            or a correction that needs them); None otherwise. Until the first compressed block it
            is the very same sequence as ``hidden``.
    """

    hidden: Sequence[torch.Tensor]
    extra: dict[tuple[int, int], dict[int, tuple[tuple, dict]]]
    reference: Sequence[torch.Tensor] | None = None

    def args_for(self, block: int, batch: torch.Tensor) -> tuple[tuple, dict]:
        """Block ``block``'s extra (args, kwargs) for a batch shaped like ``batch``."""
        return self.extra[tuple(batch.shape[:2])][block]


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states (the first element when it returns a tuple)."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockContext:
    """A decoder block with its calibration inputs and the uncompressed block's outputs.

    A scaling that asks for ``"block"`` gets one in ``LayerStats.block``: it can run the block with
    ``local`` replaced by a candidate weight (through ``torch.func.functional_call``) and compare
    with ``targets``, so it can optimise the block's output error instead of the layer's own.

    Attributes:
        block: The decoder block (on the compute device).
        local: The layer's name inside the block.
        inputs: The block's calibration inputs.
        index: The block's index.
        targets: The uncompressed block's output per calibration batch.
    """

    block: nn.Module
    local: str
    inputs: BlockInputs
    index: int
    targets: Sequence[torch.Tensor]

    def run(self, batch: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output on calibration batch ``batch``, with ``params`` substituted."""
        hidden = self.inputs.hidden[batch]
        args, kwargs = self.inputs.args_for(self.index, hidden)
        if params is None:
            return run_block(self.block, hidden, args, kwargs)
        out = torch.func.functional_call(self.block, params, (hidden, *args), kwargs, strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out
