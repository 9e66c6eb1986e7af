"""Exceptions. Every one says what was expected; none is raised after the model was changed."""

from __future__ import annotations

__all__ = ["LowrankError", "RegistryError", "RecipeError", "CompressionError", "CheckpointError",
           "DeviceError"]


class LowrankError(Exception):
    """Base class of every error `lowrank` raises on purpose."""


class RegistryError(LowrankError, LookupError):
    """Unknown or clashing plugin names, or a malformed plugin."""


class RecipeError(LowrankError, ValueError):
    """A recipe (object or file) that cannot be run: unknown keys, wrong types, bad values."""


class CompressionError(LowrankError, ValueError):
    """Bad input to the pipeline: non-finite weights, empty calibration, targets that match nothing."""


class CheckpointError(LowrankError, ValueError):
    """A checkpoint directory that cannot be read as it is: a missing, truncated or corrupt file, a
    ``config.json`` that is not valid, or tensors that do not match what the config records."""


class DeviceError(LowrankError, RuntimeError):
    """A device that was asked for by name (``cuda``, ``cuda:N``, ``mps``) is not available here."""
