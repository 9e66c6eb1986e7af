"""The built-in exporters.

``hf``: a normal Hugging Face checkpoint directory whose factored layers are stored as
``<module>.A`` / ``<module>.B`` / ``<module>.bias``. ``config.json`` carries a
``quantization_config`` record (``quant_method: lowrank``, the rank of every factored layer, the
recipe's targets), so ``lowrank.load`` -- or plain ``AutoModelForCausalLM.from_pretrained`` once
``lowrank`` is imported -- rebuilds the same modules and reproduces the logits bit for bit.

``dense``: every factored layer multiplied back (A @ B in float64, cast to the layer dtype) into an
ordinary checkpoint that any tool reads without lowrank (no size saving, and no further loss).

Both write atomically (``lowrank.atomic_directory``), put the tokenizer, ``recipe.yaml`` and
``lowrank_report.json`` beside the weights, and leave the model passed in untouched.

Module-level imports stay light: the registry imports this plugin whenever a recipe is built.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lowrank
from lowrank._errors import LowrankError
from lowrank._exporter import atomic_directory, check_output_directory
from lowrank._io import attach_provenance

__all__ = ["HFExporter", "DenseExporter"]

_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"


# -- shared helpers -------------------------------------------------------------------------------


def _factored_layers(model: Any) -> dict[str, Any]:
    """Every ``LowRankLinear`` of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, lowrank.LowRankLinear)}


def _provenance(model: Any, recipe: Any, report: Any) -> tuple[Any, Any]:
    """The recipe and report to write: the arguments, else what ``compress`` stored on the model."""
    recipe = recipe if recipe is not None else getattr(model, "lowrank_recipe", None)
    report = report if report is not None else getattr(model, "lowrank_report", None)
    return recipe, report


def _write_beside(directory: Path, tokenizer: Any, recipe: Any, report: Any) -> None:
    from lowrank._recipe import RECIPE_FILE
    from lowrank._report import REPORT_FILE

    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recipe is not None:
        (directory / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    if report is not None:
        (directory / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")


def _torch_dtype(dtype: Any) -> Any:
    """``None``/``"auto"`` -> None (keep the saved dtype); a name or a torch.dtype -> a torch.dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LowrankError(f"dtype: expected a floating-point torch.dtype or its name, got {dtype!r}")
    return dtype


def _saved_dtype(config: Any) -> Any:
    """The dtype ``save_pretrained`` recorded in the config (a name or a torch.dtype), or None."""
    try:
        return _torch_dtype(getattr(config, "dtype", None))
    except LowrankError:
        return None


@contextmanager
def _empty_model_context(dtype: Any) -> Iterator[None]:
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


def _model_class(config: Any) -> type:
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


def _finish_assign(model: Any, missing: list[str], unexpected: list[str], what: str) -> None:
    """After ``load_state_dict(assign=True)``: tie weights, and refuse anything left unfilled."""
    if unexpected:
        raise LowrankError(f"{what}: tensors the architecture has no place for: {sorted(unexpected)[:8]}")
    model.tie_weights(missing_keys=set(missing))
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise LowrankError(f"{what}: no tensor for {sorted(empty)[:8]}")


# -- the exporters ---------------------------------------------------------------------------------


class _Checkpoint(lowrank.Exporter):
    """What both exporters share: provenance files, atomic writes, plain loading."""

    def _write(self, directory: str | os.PathLike[str], tokenizer: Any, recipe: Any, report: Any,
               write_weights: Any) -> Path:
        with atomic_directory(directory) as tmp:
            write_weights(tmp)
            _write_beside(tmp, tokenizer, recipe, report)
        return Path(directory)

    def _load_plain(self, directory: str | os.PathLike[str], device: str, dtype: Any) -> Any:
        from transformers import AutoModelForCausalLM

        dtype = _torch_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype if dtype is not None else "auto", device_map={"": device})
        attach_provenance(model, Path(directory))
        return model.eval()


class HFExporter(_Checkpoint):
    """Hugging Face directory with factorized weights; reloads with from_pretrained."""

    name = "hf"

    def record(self, model: Any, recipe: Any = None) -> dict[str, Any]:
        """The ``quantization_config`` written to ``config.json``."""
        from lowrank._hf_quantizer import FORMAT_VERSION, QUANT_METHOD

        old = getattr(model.config, "quantization_config", None)
        old = old.to_dict() if hasattr(old, "to_dict") else dict(old or {})
        layers = _factored_layers(model)
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "exporter": self.name,
            "rank_pattern": {n: int(m.rank) for n, m in layers.items()},
            # factors deliberately stored in another dtype than the model's (a recipe's ``dtype``):
            # from_pretrained would otherwise cast them to the model's dtype
            "dtype_pattern": {n: str(m.A.dtype).removeprefix("torch.") for n, m in layers.items()
                              if m.A.dtype != model.dtype},
            "targets": recipe.targets if recipe is not None else old.get("targets"),
            "ignore": list(recipe.ignore) if recipe is not None else old.get("ignore", []),
            "recipe_name": recipe.name if recipe is not None else old.get("recipe_name"),
            "lowrank_version": lowrank.__version__,
        }

    def save(self, model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None,
             recipe: Any = None, report: Any = None) -> Path:
        """Write ``model`` with its factors as they are (see the module docstring)."""
        check_output_directory(directory)
        recipe, report = _provenance(model, recipe, report)
        if not _factored_layers(model) and recipe is None and getattr(model.config, "quantization_config", None) is None:
            raise LowrankError(
                "hf export: the model has no LowRankLinear layer and no lowrank_recipe, so it was never "
                "compressed; run lowrank.compress first, or write an ordinary checkpoint with exporter='dense'"
            )
        record = self.record(model, recipe)

        def write_weights(tmp: Path) -> None:
            # save_pretrained writes config.json from model.config (and sets its dtype and
            # architectures): hand it a copy that carries the record, then put the original back.
            original = model.config
            config = copy.deepcopy(original)
            config.quantization_config = record
            model.config = config
            try:
                model.save_pretrained(tmp)
            finally:
                model.config = original

        return self._write(directory, tokenizer, recipe, report, write_weights)

    def load(self, directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
        """Rebuild the architecture with empty parameters, swap in ``LowRankLinear`` per
        ``rank_pattern``, assign the safetensors, tie weights. Independent of the quantizer hook."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, GenerationConfig

        from lowrank._hf_quantizer import check_record, replace_with_lowrank

        path = Path(directory)
        config = AutoConfig.from_pretrained(path)
        record = getattr(config, "quantization_config", None) or {}
        rank_pattern, dtype_pattern = check_record(record.to_dict() if hasattr(record, "to_dict") else record)
        dtype = _torch_dtype(dtype)
        with _empty_model_context(dtype or _saved_dtype(config)):
            model = _model_class(config)(config)
        replace_with_lowrank(model, rank_pattern, dtype_pattern)

        if (path / _SAFE_INDEX).is_file():
            files = sorted(set(json.loads((path / _SAFE_INDEX).read_text())["weight_map"].values()))
        else:
            files = [_SAFE_SINGLE]
        state: dict[str, Any] = {}
        for name in files:
            state.update(load_file(path / name, device=str(device)))
        if dtype is not None:  # cast what the checkpoint holds in the model's dtype
            kept = {f"{n}.{p}" for n in dtype_pattern for p in ("A", "B", "bias")}
            state = {k: v.to(dtype) if v.is_floating_point() and k not in kept else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        _finish_assign(model, missing, unexpected, f"loading {path}")
        model.to(device)  # the buffers, built on the CPU
        if model.can_generate() and (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        attach_provenance(model, path)
        return model.eval()


class DenseExporter(_Checkpoint):
    """Merged dense weights as an ordinary checkpoint."""

    name = "dense"

    @staticmethod
    def dense_copy(model: Any) -> Any:
        """A model of the same class with each ``LowRankLinear`` replaced by its merged dense layer.

        Unfactored tensors are shared with ``model`` (no copy); ``model`` itself is not changed.
        """
        import torch

        config = copy.deepcopy(model.config)
        for attr in ("quantization_config", "_is_quantized"):
            if hasattr(config, attr):
                delattr(config, attr)
        with _empty_model_context(model.dtype):
            dense = type(model)(config)
        state = dict(model.state_dict())
        with torch.no_grad():
            for name, layer in _factored_layers(model).items():
                del state[f"{name}.A"], state[f"{name}.B"]
                target = dense.get_submodule(name)
                # float64 product so the merge adds no error beyond the final rounding, into the
                # dense layer's dtype (factors may be stored narrower, by a recipe's ``dtype``)
                weight = (layer.A.double() @ layer.B.double()).to(target.weight.dtype)
                if type(target).__name__ == "Conv1D":  # GPT-2 stores (in x out)
                    weight = weight.T
                state[f"{name}.weight"] = weight.contiguous()
                if layer.bias is not None:
                    state[f"{name}.bias"] = layer.bias.detach().to(target.weight.dtype)
        missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
        _finish_assign(dense, missing, unexpected, "dense export")
        if getattr(model, "generation_config", None) is not None:
            dense.generation_config = copy.deepcopy(model.generation_config)
        return dense.eval()

    def save(self, model: Any, directory: str | os.PathLike[str], *, tokenizer: Any = None,
             recipe: Any = None, report: Any = None) -> Path:
        """Write an ordinary checkpoint (no ``quantization_config``; loads without lowrank)."""
        check_output_directory(directory)
        recipe, report = _provenance(model, recipe, report)
        dense = self.dense_copy(model)
        return self._write(directory, tokenizer, recipe, report, dense.save_pretrained)

    def load(self, directory: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
        """Plain ``AutoModelForCausalLM.from_pretrained``."""
        return self._load_plain(directory, device, dtype)
STRATEGIES = [HFExporter, DenseExporter]
