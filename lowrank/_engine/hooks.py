"""What a run may do around each decoder block: nothing in memory, load / write / free when streamed.

The compression pass and the global planner call a :class:`BlockHooks` before and after every
block. The in-memory run (:func:`lowrank.compress`) uses this base class, which does nothing; a
streamed run (``_engine/stream.py``) reads the block's weights from the safetensors shards before
it, writes the block's factors and frees it after it, and persists what a resumed run needs.
"""

from __future__ import annotations

from .._contract.blocks import BlockInputs
from .._contract.spectrum import Selection

__all__ = ["BlockHooks"]


class BlockHooks:
    """Callbacks around each block of a run; every method of the base class does nothing."""

    #: Whether blocks live on disk between passes (only one block is ever in memory), so that a
    #: pass through the whole model at once (a gradient pass) must go block by block.
    streams_blocks: bool = False

    def start(self, inputs: BlockInputs) -> int:
        """Before the compression pass: the first block to compress (a resumed run skips the
        finished ones and may replace ``inputs.hidden`` with the saved hidden states)."""
        return 0

    def saved_plan(self) -> dict[str, Selection] | None:
        """A global allocator's plan saved by an interrupted run, or None to plan now."""
        return None

    def planned(self, plan: dict[str, Selection]) -> dict[str, Selection]:
        """A global allocator's plan, once made; the plan the run applies (a resumable run saves
        it, a multi-process run takes process 0's)."""
        return plan

    def enter(self, index: int, phase: str) -> None:
        """Before block ``index`` runs in ``phase`` (``"planning"`` or ``"compressing"``)."""

    def leave(self, index: int, phase: str, inputs: BlockInputs) -> None:
        """After block ``index`` of ``phase``; ``inputs.hidden`` already enters the next block."""
