"""``lowrank.save`` and ``lowrank.load``: write a compressed model with its exporter, read it back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._contract.devices import resolve_device
from .._contract.errors import CheckpointError, LowrankError, RegistryError
from .._contract.exporter import Exporter
from .._contract.registry import get_registry
from .hf_record import QUANT_METHOD, check_version
from .provenance import read_config

__all__ = ["save", "load"]


def _exporter(spec: Any) -> "Exporter":
    if isinstance(spec, Exporter):
        return spec
    if isinstance(spec, type) and issubclass(spec, Exporter):
        return spec()
    if isinstance(spec, str) or spec is None:
        if spec is None:
            raise LowrankError("exporter: none given and no plugin declares a default exporter")
        return get_registry().get("exporter", spec)()
    raise LowrankError(f"exporter: expected a registered name or a lowrank.Exporter, got {spec!r}")


def save(model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None, exporter: Any = None) -> Path:
    """Write a compressed ``model`` (and ``tokenizer``, the recipe and the report) to ``directory``.

    Args:
        model: a model compressed by :func:`lowrank.compress` (or loaded back by :func:`load`).
        directory: a new or empty directory; it appears only once everything is written.
        tokenizer: saved beside the weights when given.
        exporter: a registered exporter name (``"hf"``, ``"dense"``) or an ``Exporter``; by default
            the recipe's exporter, else the registered default exporter. Only ``"dense"`` accepts a model that was never
            compressed (it then writes an ordinary checkpoint).
    """
    if exporter is None:
        recipe = getattr(model, "lowrank_recipe", None)
        exporter = getattr(recipe, "exporter", None) or get_registry().default("exporter")
    return _exporter(exporter).save(model, directory, tokenizer=tokenizer)


def load(directory: str | os.PathLike[str], *, device: Any = "cpu", dtype: Any = None) -> Any:
    """Load a checkpoint written by :func:`save` (or any plain causal-LM checkpoint).

    A ``config.json`` whose ``quantization_config`` says ``quant_method: lowrank`` is read by the
    exporter it names; anything else by ``AutoModelForCausalLM.from_pretrained``. ``dtype`` (a
    ``torch.dtype`` or its name) casts floating-point weights; ``None`` keeps the saved dtype.
    ``device`` is a device name (``auto`` picks CUDA when present); one that is not available
    raises :class:`lowrank.DeviceError`.

    Everything is checked before a tensor is read: the format version, the exporter, the
    safetensors headers against the config (shapes, ranks, dtypes, counts). A checkpoint that fails
    raises :class:`lowrank.CheckpointError`; only safetensors files are ever read.
    """
    device = str(resolve_device(device if device is not None else "cpu")[0])
    record = read_config(directory).get("quantization_config")
    if record is None:
        name = "dense"  # a plain checkpoint: the dense exporter's load is plain from_pretrained
    elif not isinstance(record, dict):
        raise CheckpointError(f"{Path(directory) / 'config.json'}: quantization_config must be an "
                              f"object, got {type(record).__name__}")
    elif record.get("quant_method") == QUANT_METHOD:
        check_version(record)
        name = record.get("exporter", "hf")
        if not isinstance(name, str):
            raise CheckpointError(f"{Path(directory) / 'config.json'}: exporter must be a name, got {name!r}")
    else:
        name = "dense"  # another library's quantization: transformers reads it
    try:
        exporter = _exporter(name)
    except RegistryError as err:
        raise CheckpointError(
            f"{Path(directory) / 'config.json'} says the checkpoint was written by the exporter "
            f"{name!r}, which is not installed here; install the plugin that provides it ({err})"
        ) from None
    return exporter.load(directory, device=device, dtype=dtype)
