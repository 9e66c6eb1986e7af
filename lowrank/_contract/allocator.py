"""The allocator base: which singular components each matrix keeps under a parameter budget.

An allocator sees every matrix's spectrum in its scaled coordinates (and optional per-component
scores) and returns a :class:`~lowrank.Selection` per matrix: usually a prefix of the spectrum
(rank k), but any set of components with an optional rescaling per kept component is allowed.

Two scopes:

- ``"matrix"``: each matrix's decision depends only on that matrix; the engine allocates block by
  block in one pass.
- ``"global"``: the decision needs every matrix's spectrum; the engine's planner profiles the whole
  model first (calling :meth:`Allocator.prepare`, :meth:`Allocator.component_scorer` and, between
  stages, :meth:`Allocator.refine`), allocates, then compresses with the plan.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable, ClassVar, Literal, Sequence

import torch

from .context import ModelContext, RefineContext
from .factors import ScaledSVD
from .spectrum import Budget, MatrixSpectrum, Selection
from .strategy import Strategy

__all__ = ["Allocator", "ComponentScorer"]

#: Turns one calibration batch's loss gradient for W (out x in, float32) into one score per
#: singular component; the planner averages the scores over the batches.
ComponentScorer = Callable[[torch.Tensor], torch.Tensor]


class Allocator(Strategy):
    """Decides the kept components of every matrix.

    Subclasses implement :meth:`allocate`; global allocators may implement the optional protocol
    below. An allocator object holds its config only: what it learns about a model in
    :meth:`prepare` goes into the object that method returns, never into ``self``.
    """

    kind: ClassVar[str] = "allocator"
    scope: ClassVar[Literal["matrix", "global"]] = "matrix"

    def rank_hint(self, shape: tuple[int, int], ratio: float) -> int | None:
        """The rank this allocator will give a matrix of ``shape``, if known before its SVD."""
        return None

    # -- optional protocol of global allocators ---------------------------------------------------

    def prepare(self, context: ModelContext) -> "Allocator":
        """Called once before planning, with the model and the calibration windows.

        Returns the allocator to use for this run: ``self`` when nothing is measured, else a copy
        that holds the measurements (e.g. each matrix's sensitivity). The model must be left as
        it was found; notes appended to ``context.notes`` end up in the report.
        """
        return self

    def component_scorer(self, spectrum: MatrixSpectrum, svd: ScaledSVD) -> ComponentScorer | None:
        """A scorer that turns calibration-loss gradients into per-component scores, or None.

        Called during the profiling pass, while the matrix's scaled SVD is at hand; the planner
        then runs one gradient pass and calls every scorer inside a gradient hook, so no
        model-sized gradient is held. The averaged scores arrive as ``MatrixSpectrum.scores``.
        """
        return None

    def gradient_windows(self) -> tuple[int, int] | None:
        """(windows, tokens per window) for the gradient pass; None uses the calibration windows."""
        return None

    @property
    def lean_gradients(self) -> bool:
        """Score inside a post-accumulate-grad hook and drop each gradient at once.

        False keeps a batch's gradients until its backward pass ends (the plain way, to compare).
        """
        return True

    @property
    def needs_whole_model(self) -> bool:
        """Whether :meth:`prepare` or :meth:`refine` runs the whole model at once (e.g. a loss over
        the calibration windows). A streamed run holds one block at a time and refuses such an
        allocator before it starts; gradient scores (:meth:`component_scorer`) need no such flag."""
        return False

    @property
    def stages(self) -> int:
        """Planning stages; between two of them :meth:`refine` may change the weights."""
        return 1

    @property
    def restores_dense(self) -> bool:
        """Whether a matrix the last stage plans dense gets its original weight back after the
        refinements (True), or keeps the weight they left it (False; ZS-SVD's published code)."""
        return True

    def refine(self, context: RefineContext, plan: dict[str, Selection]) -> None:
        """Between two planning stages: e.g. truncate to ``plan`` and correct the weights (ZS-SVD)."""

    @abstractmethod
    def allocate(self, spectra: Sequence[MatrixSpectrum], budget: Budget) -> list[Selection]:
        """One :class:`~lowrank.Selection` per spectrum, in order, within ``budget``."""
