"""What each layer is fitted to: the recipe's ``target`` and ``compensation`` settings, checked.

``target: plain`` fits a layer's own output on the inputs it receives; ``target: compensated``
fits the original layer's output on the original inputs (SAES-SVD), at the strength
``compensation`` (the engine's ``compensation.py`` has the maths).
"""

from __future__ import annotations

from .errors import RecipeError

__all__ = ["TARGETS", "DEFAULT_COMPENSATION", "checked_compensation"]

TARGETS = ("plain", "compensated")
#: Measured best on AUSTEN-512 (bench/results/compensation-strength-cpu.md): 0.25 of the correction.
DEFAULT_COMPENSATION = 0.25


def checked_compensation(target: str, inputs: str, compensation: object) -> float | str:
    """The validated ``compensation`` (a float in [0, 1] or ``"adaptive"``) for ``target`` and ``inputs``."""
    if target not in TARGETS:
        raise RecipeError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if target == "compensated" and inputs != "sequential":
        raise RecipeError("target: compensated corrects the shift between the original and the compressed "
                          "model's inputs, so it needs inputs: sequential (with inputs: original there is none)")
    if compensation != "adaptive" and (isinstance(compensation, bool) or not isinstance(compensation, (int, float))
                                       or not 0 <= compensation <= 1):
        raise RecipeError(f"compensation: expected adaptive or a number from 0 (plain target) to 1 (full "
                          f"compensation), got {compensation!r}")
    if target != "compensated" and compensation != DEFAULT_COMPENSATION:
        raise RecipeError("compensation sets the strength of target: compensated; with target: "
                          f"{target} it would do nothing (remove it, or set target: compensated)")
    return compensation if compensation == "adaptive" else float(compensation)  # type: ignore[arg-type]
