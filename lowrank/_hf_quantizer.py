"""The transformers side of the ``hf`` format: plain ``from_pretrained`` reads lowrank checkpoints.

A checkpoint written by the ``hf`` exporter records ``quantization_config = {"quant_method":
"lowrank", "rank_pattern": {module: rank}, ...}`` in ``config.json``. transformers builds the
architecture on the meta device, hands it to the quantizer registered for that ``quant_method``
(``preprocess_model`` -> ``_process_model_before_weight_loading``) and then loads the safetensors
into whatever parameters the model has. This module registers such a quantizer through
transformers' out-of-tree hooks (``register_quantization_config`` / ``register_quantizer``): its
only job is to swap every layer named in ``rank_pattern`` for an empty ``LowRankLinear`` so the
``<module>.A`` / ``<module>.B`` / ``<module>.bias`` tensors have somewhere to go. The factors are
ordinary floating-point parameters, so transformers' normal loading (dtype, device_map, tied
weights, sharding) does the rest.

Importing this module registers the quantizer (idempotently). ``lowrank`` imports it lazily, right
after ``transformers.quantizers.auto`` is imported (see ``lowrank._io``), so it must import only
modules that are complete at that moment: nothing from ``transformers.modeling_utils``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._errors import LowrankError
from ._layers import LowRankLinear
from ._model import is_linear, set_submodule, weight_of

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "LowRankConfig", "LowRankHfQuantizer",
           "replace_with_lowrank", "check_record", "register"]

QUANT_METHOD = "lowrank"
FORMAT_VERSION = 1


def check_record(record: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, torch.dtype]]:
    """Validate a ``quantization_config`` record; return its ``rank_pattern`` and ``dtype_pattern``
    (the factors stored in another dtype than the model's, e.g. by a recipe's ``dtype``)."""
    if record.get("quant_method") != QUANT_METHOD:
        raise LowrankError(f"quantization_config: expected quant_method {QUANT_METHOD!r}, got {record.get('quant_method')!r}")
    version = record.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LowrankError(
            f"quantization_config: format_version {version!r} is newer than this lowrank reads "
            f"({FORMAT_VERSION}); upgrade lowrank"
        )
    pattern = record.get("rank_pattern")
    if not isinstance(pattern, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in pattern.items()
    ):
        raise LowrankError(f"quantization_config: rank_pattern must map module names to ranks, got {pattern!r}")
    dtypes: dict[str, torch.dtype] = {}
    for name, dtype in (record.get("dtype_pattern") or {}).items():
        value = getattr(torch, str(dtype), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point or name not in pattern:
            raise LowrankError(f"quantization_config: dtype_pattern[{name!r}] = {dtype!r} is not a factored "
                               "layer's floating-point dtype")
        dtypes[name] = value
    return dict(pattern), dtypes


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
            raise LowrankError(
                f"the checkpoint factors module {name!r}, which {type(model).__name__} does not have"
            ) from None
        if isinstance(old, LowRankLinear):
            continue
        if not is_linear(old):
            raise LowrankError(f"the checkpoint factors {name!r}, a {type(old).__name__}, not a linear layer")
        out_features, in_features = weight_of(old).shape
        new = LowRankLinear(int(in_features), int(out_features), int(rank),
                            bias=getattr(old, "bias", None) is not None,
                            device="meta", dtype=dtype_pattern.get(name, old.weight.dtype))
        set_submodule(model, name, new)


class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an ``hf`` lowrank checkpoint (what ``config.json`` records)."""

    def __init__(self, rank_pattern: Mapping[str, int] | None = None, dtype_pattern: Mapping[str, str] | None = None,
                 format_version: int = FORMAT_VERSION,
                 exporter: str = "hf", targets: list[str] | None = None, ignore: list[str] | None = None,
                 recipe_name: str | None = None, lowrank_version: str | None = None,
                 quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.exporter = exporter
        self.rank_pattern = dict(rank_pattern or {})
        self.dtype_pattern = dict(dtype_pattern or {})
        self.targets = targets
        self.ignore = list(ignore or [])
        self.recipe_name = recipe_name
        self.lowrank_version = lowrank_version
        # keep fields written by a newer minor version so a re-save does not drop them
        for key, value in kwargs.items():
            setattr(self, key, value)


class LowRankHfQuantizer(HfQuantizer):
    """Loads ``hf`` lowrank checkpoints in ``from_pretrained``: swaps in ``LowRankLinear`` layers.

    Nothing is quantized: the factors load like any float weight. A dense model cannot be
    compressed on the fly (``requires_calibration``): use :func:`lowrank.compress`.
    """

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_record(self.quantization_config.to_dict())

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        replace_with_lowrank(model, *check_record(self.quantization_config.to_dict()))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # a local checkpoint: bring back its recipe and report, as lowrank.load does
        directory = getattr(getattr(model, "config", None), "name_or_path", None)
        if directory and os.path.isdir(directory):
            from ._io import attach_provenance

            attach_provenance(model, directory)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True  # the factors are plain tensors; save_pretrained writes them back as they were

    @property
    def is_trainable(self) -> bool:
        return True  # A and B are ordinary parameters

    @property
    def is_qat_trainable(self) -> bool:
        return True  # so transformers' Trainer fine-tunes the factors directly, without adapters


def register() -> None:
    """Register the config and the quantizer with transformers (once; safe to call again)."""
    for mapping, cls, add in ((AUTO_QUANTIZATION_CONFIG_MAPPING, LowRankConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, LowRankHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None and existing.__module__ == __name__:
            del mapping[QUANT_METHOD]  # a stale class from a reload of this module
        add(QUANT_METHOD)(cls)  # another package owning "lowrank" makes transformers raise here


register()
