"""What sits beside the weights in a checkpoint: the recipe and the report (provenance)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .._contract.errors import CheckpointError, LowrankError
from .._contract.recipe import RECIPE_FILE, Recipe
from .._contract.report import REPORT_FILE, CompressionReport

__all__ = ["read_config", "attach_provenance", "write_provenance", "provenance_of"]

_MAX_CONFIG_BYTES = 16 << 20


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, as a dict."""
    import json

    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{str(directory)!r} is not a model directory: it does not exist (no config.json)")
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a model directory: it has no config.json")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte offset {err.start}); the checkpoint is damaged") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def attach_provenance(model: Any, directory: str | os.PathLike[str]) -> None:
    """Put the ``recipe.yaml`` / ``lowrank_report.json`` found beside a checkpoint back on the model
    (as ``compress`` leaves them), so that saving it again keeps them."""
    import json

    directory = Path(directory)
    if (directory / REPORT_FILE).is_file():
        try:
            data = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
            model.lowrank_report = CompressionReport.from_dict(data)
        except Exception as err:  # noqa: BLE001 - provenance only: the weights are fine without it
            warnings.warn(f"lowrank: loaded the model but not its {REPORT_FILE}, which cannot be read "
                          f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=3)
    if (directory / RECIPE_FILE).is_file():
        try:
            model.lowrank_recipe = Recipe.load(directory / RECIPE_FILE)
        except LowrankError as err:  # e.g. a third-party scaling that is not installed here
            warnings.warn(f"lowrank: loaded the model but not its recipe: {err}", RuntimeWarning, stacklevel=3)


def provenance_of(model: Any, recipe: Any, report: Any) -> tuple[Any, Any]:
    """The recipe and report to write: the arguments, else what ``compress`` stored on the model."""
    recipe = recipe if recipe is not None else getattr(model, "lowrank_recipe", None)
    report = report if report is not None else getattr(model, "lowrank_report", None)
    return recipe, report


def write_provenance(directory: Path, tokenizer: Any, recipe: Any, report: Any) -> None:
    """The tokenizer, ``recipe.yaml`` and ``lowrank_report.json`` beside the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recipe is not None:
        (directory / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    if report is not None:
        (directory / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
