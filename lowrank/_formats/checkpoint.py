"""What the ``hf`` and ``dense`` formats share: atomic writes with provenance, building an empty
model of the recorded class, assigning tensors, dtype names."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .._contract.errors import CheckpointError, LowrankError
from .._contract.exporter import Exporter, atomic_directory
from .._contract.layers import LowRankLinear
from .._contract.recipe import RECIPE_FILE
from .._contract.report import REPORT_FILE
from .files import check_against, tensor_entries, weight_files
from .provenance import attach_provenance, read_config, write_provenance

__all__ = ["CheckpointExporter", "factored_layers", "torch_dtype", "saved_dtype", "empty_model_context",
           "model_class", "finish_assign", "read_hf_config", "read_tensors", "check_plain_checkpoint"]


def read_hf_config(directory: Path) -> Any:
    """``AutoConfig`` of a checkpoint directory; a config transformers cannot read is a
    :class:`CheckpointError` (unknown ``model_type``, wrong field types, ...)."""
    from transformers import AutoConfig

    read_config(directory)  # exists, UTF-8, a JSON object
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        message = " ".join(str(err).split())[:400]
        raise CheckpointError(f"{Path(directory) / 'config.json'}: transformers cannot build a config "
                              f"from it ({type(err).__name__}: {message})") from None


def read_tensors(path: Path, device: str) -> dict[str, Any]:
    """The tensors of one safetensors file (its header was checked already)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err}); the checkpoint is damaged") from None


def check_plain_checkpoint(directory: Path, dtype: Any = None) -> None:
    """Before ``from_pretrained`` reads a checkpoint without a lowrank record: safetensors only,
    every file complete, every tensor's shape and dtype what ``config.json`` implies. One that
    lowrank wrote (``recipe.yaml`` or ``lowrank_report.json`` beside it) must also hold every
    tensor and no other."""
    entries = tensor_entries(weight_files(directory))
    config = read_hf_config(directory)
    if getattr(config, "quantization_config", None) is not None:
        return  # another library's quantized layout: its tensors are not the dense shapes
    with empty_model_context(dtype or saved_dtype(config)):
        model = model_class(config)(config)
    strict = (directory / RECIPE_FILE).is_file() or (directory / REPORT_FILE).is_file()
    check_against(model, entries, where=str(directory), strict=strict)


def factored_layers(model: Any) -> dict[str, Any]:
    """Every ``LowRankLinear`` of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def torch_dtype(dtype: Any) -> Any:
    """``None``/``"auto"`` -> None (keep the saved dtype); a name or a torch.dtype -> a torch.dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LowrankError(f"dtype: expected a floating-point torch.dtype or its name, got {dtype!r}")
    return dtype


def saved_dtype(config: Any) -> Any:
    """The dtype ``save_pretrained`` recorded in the config (a name or a torch.dtype), or None."""
    try:
        return torch_dtype(getattr(config, "dtype", None))
    except LowrankError:
        return None


@contextmanager
def empty_model_context(dtype: Any) -> Iterator[None]:
    """Build with parameters on the meta device but buffers real (computed in ``__init__``, e.g.
    rotary ``inv_freq``), under ``dtype`` as the default so buffers match a ``from_pretrained``."""
    import torch
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        torch.set_default_dtype(previous)


def model_class(config: Any) -> type:
    """The causal-LM class recorded in ``config.architectures``, else the auto mapping's."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise LowrankError(f"no causal-LM class known for {type(config).__name__}; load it with "
                           "AutoModelForCausalLM.from_pretrained (trust_remote_code if needed)") from None


def finish_assign(model: Any, missing: list[str], unexpected: list[str], what: str) -> None:
    """After ``load_state_dict(assign=True)``: tie weights, and refuse anything left unfilled."""
    if unexpected:
        raise LowrankError(f"{what}: tensors the architecture has no place for: {sorted(unexpected)[:8]}")
    model.tie_weights(missing_keys=set(missing))
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise LowrankError(f"{what}: no tensor for {sorted(empty)[:8]}")


class CheckpointExporter(Exporter):
    """What both exporters share: provenance files, atomic writes, plain loading."""

    def _write(self, directory: str | os.PathLike[str], tokenizer: Any, recipe: Any, report: Any,
               write_weights: Any) -> Path:
        with atomic_directory(directory) as tmp:
            write_weights(tmp)
            write_provenance(tmp, tokenizer, recipe, report)
        return Path(directory)

    def _load_plain(self, directory: str | os.PathLike[str], device: str, dtype: Any) -> Any:
        from transformers import AutoModelForCausalLM

        dtype = torch_dtype(dtype)
        check_plain_checkpoint(Path(directory), dtype)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype if dtype is not None else "auto", device_map={"": device},
            use_safetensors=True)
        attach_provenance(model, Path(directory))
        return model.eval()
