"""Per-matrix spectra of a model, compressed or not, and their plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._contract.diagnostics import effective_rank, participation_ratio
from .._contract.layers import LowRankLinear
from .._contract.model import is_linear, weight_of
from .discovery import find_blocks

__all__ = ["MatrixInfo", "inspect_model", "plot_inspection"]


@dataclass
class MatrixInfo:
    """One linear layer of a decoder block, dense or factored, and its spectrum."""

    name: str
    block: int
    shape: tuple[int, int]
    rank: int | None
    params: int
    effective_rank: float
    participation_ratio: float
    singular_values: torch.Tensor
    # from the compression report, when the model carries one and a learned scaling reported them:
    # the spectrum of the matrix as that scaling received it and of the learned scaled matrix
    effective_rank_before: float | None = None
    effective_rank_after: float | None = None
    participation_ratio_before: float | None = None
    participation_ratio_after: float | None = None
    #: the report's per-matrix numbers from scalings and allocators ("<strategy>.<key>")
    diagnostics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (the spectrum left out)."""
        return {"name": self.name, "block": self.block, "shape": list(self.shape), "rank": self.rank,
                "params": self.params, "effective_rank": self.effective_rank,
                "participation_ratio": self.participation_ratio,
                "effective_rank_before": self.effective_rank_before, "effective_rank_after": self.effective_rank_after,
                "participation_ratio_before": self.participation_ratio_before,
                "participation_ratio_after": self.participation_ratio_after, "diagnostics": dict(self.diagnostics)}


@torch.no_grad()
def inspect_model(model: nn.Module) -> list[MatrixInfo]:
    """Every linear layer (dense or factored) inside the decoder blocks."""
    prefix, blocks = find_blocks(model)
    report = getattr(model, "lowrank_report", None)
    reported = {m.name: m for m in report.matrices} if report is not None else {}
    rows = []
    for i, block in enumerate(blocks):
        for local, module in block.named_modules():
            if isinstance(module, LowRankLinear):
                a, b = module.A.double(), module.B.double()
                # singular values of A B from the small k x k core: A = Qa Ra, B^T = Qb Rb
                ra = torch.linalg.qr(a).R
                rb = torch.linalg.qr(b.T).R
                s = torch.linalg.svdvals(ra @ rb.T)
                shape, rank = (module.out_features, module.in_features), module.rank
                params = module.A.numel() + module.B.numel()
            elif local and is_linear(module):
                w = weight_of(module).double()
                s = torch.linalg.svdvals(w)
                shape, rank, params = tuple(w.shape), None, w.numel()
            else:
                continue
            info = MatrixInfo(f"{prefix}.{i}.{local}", i, shape, rank, params,
                              effective_rank(s), participation_ratio(s), s.float())
            m = reported.get(info.name)
            if m is not None:
                for key in ("effective_rank_before", "effective_rank_after", "participation_ratio_before",
                            "participation_ratio_after"):
                    setattr(info, key, getattr(m, key, None))
                info.diagnostics = dict(m.diagnostics)
            rows.append(info)
    return rows


def plot_inspection(rows: list[MatrixInfo], path: str, title: str = "") -> None:
    """Left: normalized singular-value spectra by matrix type; right: rank kept per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r.name.rsplit(".", 1)[-1] for r in rows})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        s = r.singular_values
        if s.numel() == 0 or float(s[0]) == 0:
            continue
        x = torch.arange(s.numel()) / min(r.shape)  # a factored layer's spectrum ends at its rank
        ax1.plot(x, (s / s[0]).numpy(), color=colors[r.name.rsplit(".", 1)[-1]], alpha=0.35, lw=0.8)
    for k in kinds:
        ax1.plot([], [], color=colors[k], label=k)
    ax1.set_yscale("log")
    ax1.set_xlabel("component index / min(out, in)")
    ax1.set_ylabel("sigma_i / sigma_1")
    ax1.set_title("normalized singular-value spectra")
    ax1.legend(fontsize=8, ncol=2)
    for k in kinds:
        sel = [r for r in rows if r.name.rsplit(".", 1)[-1] == k]
        ranks = [(r.rank if r.rank is not None else min(r.shape)) / min(r.shape) for r in sel]
        ax2.plot([r.block for r in sel], ranks, marker="o", ms=3, color=colors[k], label=k)
    ax2.set_xlabel("decoder block")
    ax2.set_ylabel("rank kept / full rank (dense = 1)")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("ranks kept per block")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
