"""``lowrank compress MODEL --stream``: compress a checkpoint on disk block by block.

The model is never loaded whole (``lowrank.compress_checkpoint``): each decoder block is read from
the safetensors shards when it is compressed and written to the output at once, so host memory
does not grow with the number of blocks. ``--resume`` continues a run that was interrupted. The
same command runs on several processes under ``torchrun --nproc-per-node N -m lowrank.cli
compress ...`` (implied ``--stream``). Perplexity is not measured here (that needs the whole
model): run ``lowrank eval OUT`` afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_streamed"]


def run_streamed(model_name: str, recipe: Any, out_dir: Path, calib: str, calib_windows: int, seqlen: int,
                 batch_size: int, resume: bool, dtype: str | None, echo: Any,
                 offload: str | None = None) -> dict:
    """Compress ``model_name`` (a checkpoint directory or a bundled name) into ``out_dir`` streamed;
    the result as the JSON-ready dict that ``lowrank compress --json`` prints."""
    import os

    from lowrank import CheckpointError, compress_checkpoint
    from lowrank.data import load_windows, resolve_model

    from ._common import open_tokenizer

    source = Path(model_name) if Path(model_name).is_dir() else resolve_model(model_name)
    tokenizer = open_tokenizer(str(source))
    if tokenizer is None:
        raise CheckpointError(f"{source} has no tokenizer, which --stream needs to cut the calibration text")
    speak = int(os.environ.get("RANK", "0")) == 0  # under torchrun, process 0 speaks
    if speak:
        echo(recipe.summary())
    calibration = load_windows(tokenizer, calib, "calibration", calib_windows, seqlen, seed=recipe.seed)
    torch_dtype = None
    if dtype is not None:
        import torch

        torch_dtype = getattr(torch, dtype)
    report = compress_checkpoint(source, out_dir, recipe, calibration, batch_size=batch_size, resume=resume,
                                 dtype=torch_dtype, offload=offload)
    if speak:
        echo(report.summary())
        echo(f"wrote {out_dir} (streamed; measure perplexity with: lowrank eval {out_dir})")
    return {"model": model_name, "out": str(out_dir), "recipe": recipe.to_dict(), "streamed": True, "offload": offload,
            "processes": int(os.environ.get("WORLD_SIZE", "1")), "ratio_achieved": report.ratio_achieved,
            "model_params_before": report.model_params_before, "model_params_after": report.model_params_after,
            "timings": report.timings, "peak_memory_bytes": report.peak_memory_bytes}
