"""Device names: ``auto`` picks what is there; any other name must exist, or it is an error."""

from __future__ import annotations

from typing import Any

import torch

from .errors import DeviceError

__all__ = ["resolve_device"]


def _unavailable(device: str, why: str) -> DeviceError:
    return DeviceError(
        f"device {device!r} was asked for, but {why} (torch {torch.__version__}). Use device 'cpu', "
        "or 'auto', which picks CUDA when there is one and the CPU otherwise; an explicit device is "
        "never replaced silently"
    )


def resolve_device(device: Any = "auto") -> tuple[torch.device, list[str]]:
    """The ``torch.device`` that a device name means here, and notes for the report (none today).

    ``auto`` (or ``None``) picks CUDA when present, else the CPU. ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` are taken at their word: one that is not available raises :class:`DeviceError`
    instead of falling back, so a run never ends up somewhere other than where it was sent.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}") from None
    name = str(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise _unavailable(name, "this machine has no usable CUDA device")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise _unavailable(name, f"this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise _unavailable(name, "the MPS backend is not available here")
    elif resolved.type not in ("cpu", "meta"):
        raise DeviceError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return resolved, []
