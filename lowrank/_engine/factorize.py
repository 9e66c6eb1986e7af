"""Taking the scaled SVD of a block's matrices: the scalings in order, then one SVD each."""

from __future__ import annotations

from typing import Sequence

import torch

from .._contract.factors import ScaledSVD
from .._contract.operators import Transform
from .._contract.scaling import Scaling
from .._contract.stats import LayerStats

__all__ = ["scaled_svd", "scaled_svd_batch"]


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u, s, vh, []
    except RuntimeError:
        # gesdd can fail to converge on badly scaled input; gesvd (CUDA) / an eigh route is slower
        # but robust. Report it instead of crashing.
        if w.is_cuda:
            u, s, vh = torch.linalg.svd(w, full_matrices=False, driver="gesvd")
        else:
            import numpy as np
            import scipy.linalg

            u_, s_, vh_ = scipy.linalg.svd(w.numpy(), full_matrices=False, lapack_driver="gesvd")
            u, s, vh = (torch.from_numpy(np.ascontiguousarray(a)) for a in (u_, s_, vh_))
        return u, s, vh, ["SVD fell back to the gesvd driver"]


def scaled_svd(weight: torch.Tensor, stats: LayerStats, scalings: Sequence[Scaling],
               rank: int | None = None) -> ScaledSVD:
    """Apply the scalings in order (each sees the previous one's output), then take the SVD."""
    return scaled_svd_batch([weight], [stats], scalings, [rank])[0]


def scaled_svd_batch(weights: Sequence[torch.Tensor], stats: Sequence[LayerStats], scalings: Sequence[Scaling],
                     ranks: Sequence[int | None]) -> list[ScaledSVD]:
    """``scaled_svd`` for several matrices of one block; each scaling fits them in one call."""
    ws = list(weights)
    st = list(stats)
    transforms: list[list[Transform]] = [[] for _ in ws]
    notes: list[list[str]] = [[] for _ in ws]
    diagnostics: list[dict[str, float]] = [{} for _ in ws]
    for i, scaling in enumerate(scalings):
        fitted = scaling.fit_batch(list(zip(ws, st, ranks)))
        for j, t in enumerate(fitted):
            notes[j].extend(f"{scaling.name}: {n}" for n in t.notes)
            diagnostics[j].update({f"{scaling.name}.{k}": float(v) for k, v in t.diagnostics.items()})
            ws[j] = t.apply(ws[j])
            if i + 1 < len(scalings):  # the next scaling sees the inputs in the scaled coordinates
                st[j] = st[j].transformed(t)
            transforms[j].append(t)
    out = []
    for j, w in enumerate(ws):
        if not torch.isfinite(w).all():
            raise FloatingPointError("the scaled weight is not finite")
        u, s, vh, svd_notes = _svd(w)
        out.append(ScaledSVD(u, s, vh, transforms[j], notes[j] + svd_notes, diagnostics[j]))
    return out
