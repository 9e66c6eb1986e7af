"""Taking the scaled SVD of a block's matrices: the scalings in order, then one thin SVD each
(``svd.py`` picks the route)."""

from __future__ import annotations

from typing import Sequence

import torch

from .._contract.factors import ScaledSVD
from .._contract.operators import Transform
from .._contract.scaling import Scaling
from .._contract.stats import LayerStats
from .svd import thin_svd

__all__ = ["scaled_svd", "scaled_svd_batch"]


def scaled_svd(weight: torch.Tensor, stats: LayerStats, scalings: Sequence[Scaling],
               rank: int | None = None, method: str = "auto") -> ScaledSVD:
    """Apply the scalings in order (each sees the previous one's output), then take the SVD.

    ``rank`` is the rank that will be kept, when known (learned scalings optimise for it); every
    component of the result is accurate (the engine itself asks only for the ones it can keep).
    """
    return scaled_svd_batch([weight], [stats], scalings, [rank], method)[0]


def scaled_svd_batch(weights: Sequence[torch.Tensor], stats: Sequence[LayerStats], scalings: Sequence[Scaling],
                     ranks: Sequence[int | None], method: str = "auto",
                     accurate: Sequence[int | None] | None = None) -> list[ScaledSVD]:
    """``scaled_svd`` for several matrices of one block; each scaling fits them in one call.

    ``method`` is the recipe's ``factorization`` (``auto``, ``randomized`` or ``svd``; see ``svd.py``);
    ``accurate`` how many leading components of each must be accurate (default: all).
    """
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
        svd = thin_svd(w, None if accurate is None else accurate[j], method)
        out.append(ScaledSVD(svd.u, svd.s, svd.vh, transforms[j], notes[j] + svd.notes, diagnostics[j],
                             method=svd.method, seconds=svd.seconds))
    return out
