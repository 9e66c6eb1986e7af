"""The ``hf`` format's record: what ``config.json``'s ``quantization_config`` says, and the layers it
implies.

A checkpoint written by the ``hf`` exporter records ``quantization_config = {"quant_method":
"lowrank", "format_version": 1, "rank_pattern": {module: rank}, "dtype_pattern": {...}, ...}``.
Both readers -- :meth:`HFExporter.load` and the transformers quantizer behind ``from_pretrained``
-- validate it with :func:`check_record` and rebuild the factored layers with
:func:`replace_with_lowrank`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .._contract.errors import CheckpointError
from .._contract.layers import LowRankLinear
from .._contract.model import is_linear, set_submodule, weight_of

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "check_record", "check_version", "replace_with_lowrank"]

QUANT_METHOD = "lowrank"
FORMAT_VERSION = 1


def check_record(record: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, torch.dtype]]:
    """Validate a ``quantization_config`` record; return its ``rank_pattern`` and ``dtype_pattern``
    (the factors stored in another dtype than the model's, e.g. by a recipe's ``dtype``)."""
    if not isinstance(record, Mapping) or record.get("quant_method") != QUANT_METHOD:
        got = record.get("quant_method") if isinstance(record, Mapping) else record
        raise CheckpointError(f"quantization_config: expected quant_method {QUANT_METHOD!r}, got {got!r}")
    check_version(record)
    pattern = record.get("rank_pattern")
    if not isinstance(pattern, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in pattern.items()
    ):
        raise CheckpointError(f"quantization_config: rank_pattern must map module names to ranks "
                              f"(non-negative integers), got {str(pattern)[:200]}")
    dtypes: dict[str, torch.dtype] = {}
    dtype_pattern = record.get("dtype_pattern") or {}
    if not isinstance(dtype_pattern, Mapping):
        raise CheckpointError(f"quantization_config: dtype_pattern must map module names to dtypes, got {dtype_pattern!r}")
    for name, dtype in dtype_pattern.items():
        value = getattr(torch, str(dtype), None) if isinstance(dtype, str) else None
        if not isinstance(value, torch.dtype) or not value.is_floating_point or name not in pattern:
            raise CheckpointError(f"quantization_config: dtype_pattern[{name!r}] = {dtype!r} is not a factored "
                                  "layer's floating-point dtype")
        dtypes[name] = value
    return dict(pattern), dtypes


def check_version(record: Mapping[str, Any]) -> None:
    """Refuse a record written in a format this version of lowrank does not read."""
    version = record.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"quantization_config: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"quantization_config: format_version {version} is newer than this lowrank reads "
            f"({FORMAT_VERSION}): the checkpoint was written by a newer lowrank; upgrade lowrank "
            "(pip install -U lowrank) to read it"
        )


def replace_with_lowrank(model: nn.Module, rank_pattern: Mapping[str, int],
                         dtype_pattern: Mapping[str, torch.dtype] | None = None) -> None:
    """Swap each linear layer named in ``rank_pattern`` for an empty (meta) ``LowRankLinear``.

    The shape comes from the layer being replaced (``weight_of`` handles GPT-2's transposed
    ``Conv1D``). The factors' dtype is that layer's, so a loader casts the checkpoint as it would
    have cast the dense weight -- unless ``dtype_pattern`` says they were stored in another dtype on
    purpose; transformers then loads them in that dtype (it casts to the parameter's dtype).
    """
    dtype_pattern = dtype_pattern or {}
    for name, rank in rank_pattern.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"config.json factors module {name!r}, which {type(model).__name__} does not have; "
                "the checkpoint is damaged or was edited"
            ) from None
        if isinstance(old, LowRankLinear):
            continue
        if not is_linear(old):
            raise CheckpointError(f"config.json factors {name!r}, a {type(old).__name__}, not a linear layer")
        out_features, in_features = weight_of(old).shape
        if rank > min(out_features, in_features):
            raise CheckpointError(
                f"config.json records rank {rank} for {name!r}, a {out_features} x {in_features} "
                f"matrix, whose rank is at most {min(out_features, in_features)}; the checkpoint is "
                "damaged or was edited; nothing was loaded")
        new = LowRankLinear(int(in_features), int(out_features), int(rank),
                            bias=getattr(old, "bias", None) is not None,
                            device="meta", dtype=dtype_pattern.get(name, old.weight.dtype))
        set_submodule(model, name, new)
