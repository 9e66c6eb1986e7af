"""The compression report: per matrix and in total, plus where the time went."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MatrixReport", "CompressionReport", "REPORT_FILE"]

REPORT_FILE = "lowrank_report.json"


@dataclass
class MatrixReport:
    """What happened to one targeted matrix: its kept rank, parameters, errors and spectrum."""

    name: str
    block: int
    shape: tuple[int, int]
    rank: int | None               # None: kept dense
    params_before: int
    params_after: int
    scaled_error: float            # relative, in the scaled (e.g. whitened) Frobenius norm
    activation_error: float        # relative, ||(W - W') X|| / ||W X|| on the calibration inputs
    effective_rank: float = 0.0    # entropy form exp(-sum p log p), p = sigma / sum sigma
    notes: list[str] = field(default_factory=list)
    participation_ratio: float = 0.0   # (sum sigma)^2 / sum sigma^2 of the same (final scaled) spectrum
    # a learned scaling's view (None when no scaling reports it): the spectrum of the matrix as the
    # scaling received it (before learning) and of the learned scaled matrix (after)
    effective_rank_before: float | None = None
    effective_rank_after: float | None = None
    participation_ratio_before: float | None = None
    participation_ratio_after: float | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)  # "<scaling>.<key>", e.g. sigmascale.loss_learned
    factorization: str = ""        # how its SVD was computed: "gram-eigh" (fast route), "randomized" or "svd" (LAPACK)
    factorization_seconds: float = 0.0  # its SVD and the building of its factors

    @property
    def dense(self) -> bool:
        return self.rank is None


@dataclass
class CompressionReport:
    """The result of :func:`lowrank.compress`: every matrix's report, the totals, the time per
    phase and the notes (fallbacks, gradient passes, how the SVDs were taken)."""

    recipe_name: str
    ratio_requested: float
    matrices: list[MatrixReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def target_params_before(self) -> int:
        return sum(m.params_before for m in self.matrices)

    @property
    def target_params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)

    @property
    def ratio_achieved(self) -> float:
        """Fraction of the targeted matrices' parameters removed."""
        before = self.target_params_before
        return 1.0 - self.target_params_after / before if before else 0.0

    @property
    def dense_matrices(self) -> int:
        return sum(m.dense for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            target_params_before=self.target_params_before,
            target_params_after=self.target_params_after,
            ratio_achieved=self.ratio_achieved,
            fraction_kept=1.0 - self.ratio_achieved,
            dense_matrices=self.dense_matrices,
        )
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
        d = dict(d)
        for key in ("target_params_before", "target_params_after", "ratio_achieved", "fraction_kept", "dense_matrices"):
            d.pop(key, None)
        mats = [MatrixReport(**{**m, "shape": tuple(m["shape"])}) for m in d.pop("matrices", [])]
        return cls(matrices=mats, **d)

    def summary(self) -> str:
        """The lines the CLI prints: ratio removed and kept, parameters before and after."""
        t = self.timings
        lines = [
            f"targets: {len(self.matrices)} matrices, {self.target_params_before:,} -> "
            f"{self.target_params_after:,} parameters; removed {self.ratio_achieved:.4f} "
            f"(requested {self.ratio_requested:.4f}), kept {1 - self.ratio_achieved:.4f}; "
            f"{self.dense_matrices} kept dense",
            f"model: {self.model_params_before:,} -> {self.model_params_after:,} parameters "
            f"({1 - self.model_params_after / max(self.model_params_before, 1):.4f} of the whole model removed)",
        ]
        if t:
            lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
        if self.notes:
            lines.append("notes: " + "; ".join(self.notes))
        return "\n".join(lines)
