"""The scaled SVD of one matrix, and the factors built from a selection of its components.

These are the objects that pass between the engine and the strategies: a scaling's transforms
produce W_s = L W R = U diag(S) Vh; an allocator's :class:`~lowrank.Selection` picks components;
:func:`build_factors` folds the inverses back so that A @ B approximates W.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .operators import SpectrumChange, Transform
from .spectrum import Selection

__all__ = ["ScaledSVD", "build_factors", "scaled_gradient", "activation_error"]


@dataclass
class ScaledSVD:
    """W_s = L W R = U diag(S) Vh, with the chain of transforms that produced it."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    transforms: list[Transform]
    notes: list[str] = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)  # "<scaling>.<key>": what scalings reported
    method: str = "svd"   # how the SVD was computed: "gram-eigh" (fast route), "randomized" or "svd" (LAPACK)
    seconds: float = 0.0  # wall time of the SVD

    @property
    def spectrum_change(self) -> SpectrumChange | None:
        """What the last scaling that reported one did to the spectrum (learned scalings)."""
        for t in reversed(self.transforms):
            if t.spectrum_change is not None:
                return t.spectrum_change
        return None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ScaledSVD":
        """A copy on ``device`` (operators included), e.g. to keep profiles on the CPU."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        transforms = []
        for t in self.transforms:
            ops = []
            for op in (t.left, t.right):
                if op is None:
                    ops.append(None)
                    continue
                values = {f.name: move(getattr(op, f.name)) for f in dataclasses.fields(op)}
                ops.append(type(op)(**values))
            transforms.append(Transform(ops[0], ops[1], list(t.notes), dict(t.diagnostics), t.spectrum_change))
        return ScaledSVD(move(self.u), move(self.s), move(self.vh), transforms, list(self.notes),
                         dict(self.diagnostics), self.method, self.seconds)

    def leading(self, k: int) -> "ScaledSVD":
        """A view that keeps the singular vectors of the first ``k`` components only (``s`` stays
        complete, so ``spectrum_error`` is unchanged): what a plan that keeps at most ``k`` needs."""
        return dataclasses.replace(self, u=self.u[:, :k], vh=self.vh[:k])

    @property
    def stored_components(self) -> int:
        """How many components have their singular vectors here (see ``leading``; the randomized
        factorization stores the ones it was asked for only)."""
        return int(self.u.shape[1])

    def spectrum_error(self, selection: Selection) -> float:
        """Relative truncation error in the scaled Frobenius norm (exact, from the spectrum)."""
        kept = torch.zeros_like(self.s)
        if selection.indices is None:
            return 0.0
        idx = torch.tensor(selection.indices, dtype=torch.long, device=self.s.device)
        values = self.s[idx]
        if selection.rescale is not None:
            values = values * torch.tensor(selection.rescale, dtype=self.s.dtype, device=self.s.device)
        kept[idx] = values
        total = self.s.pow(2).sum()
        return float(((self.s - kept).pow(2).sum() / total).sqrt()) if total > 0 else 0.0


def scaled_gradient(svd: ScaledSVD, grad: torch.Tensor) -> torch.Tensor:
    """The gradient for the scaled weight W_s given the gradient for W (chain of L^-T g R^-T)."""
    for t in svd.transforms:
        grad = t.gradient(grad)
    return grad


def build_factors(svd: ScaledSVD, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """A = L^-1 U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1 for the selected components."""
    assert selection.indices is not None
    if selection.indices and max(selection.indices) >= svd.stored_components:
        # a view from ``leading``, or the randomized factorization (vectors for the kept rank only)
        raise ValueError(f"the selection keeps component {max(selection.indices)}, but singular vectors were "
                         f"computed for the leading {svd.stored_components} components only")
    idx = torch.tensor(selection.indices, dtype=torch.long, device=svd.s.device)
    s = svd.s[idx]
    if selection.rescale is not None:
        s = s * torch.tensor(selection.rescale, dtype=s.dtype, device=s.device)
    root = s.abs().sqrt()
    a = svd.u[:, idx] * (root * torch.sign(s))[None, :]
    b = root[:, None] * svd.vh[idx]
    for t in reversed(svd.transforms):  # undo the last scaling first
        if t.left is not None:
            a = t.left.inv_left(a)
        if t.right is not None:
            b = t.right.inv_right(b)
    return a, b


def activation_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor,
                     dtype: torch.dtype = torch.float64) -> float:
    """Relative error in the activation norm: sqrt(tr(D G D^T) / tr(W G W^T)), D = W - approx.

    D is formed in the inputs' precision; the two m x n x n products run in ``dtype`` and the sums
    in float64. The compression report passes float32 (half the time of float64 on a CPU; relative
    error about 1e-6, below the digits it prints); comparisons between methods keep float64.
    """
    d = (weight - approx).to(dtype)
    g = gram.to(dtype)
    w = weight.to(dtype)
    num = ((d @ g) * d).sum(dtype=torch.float64)
    den = ((w @ g) * w).sum(dtype=torch.float64)
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float((num.clamp_min(0) / den).sqrt())
