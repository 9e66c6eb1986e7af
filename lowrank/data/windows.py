"""Token windows for calibration and evaluation.

A text is tokenized once as a whole (no special tokens), then cut into fixed-length
windows: random windows for calibration (the SVD-LLM / ZS-SVD recipe) and consecutive
non-overlapping windows from token 0 for perplexity. Models that expect a BOS token at
the start of every sequence (the Gemma family) get BOS followed by ``seqlen - 1`` text
tokens per window, so every window is still exactly ``seqlen`` long.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .text import Role, load_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "calibration_windows",
    "evaluation_windows",
    "load_windows",
    "needs_bos",
    "tokenize_text",
]


def needs_bos(tokenizer_or_config: Any) -> bool:
    """Tell whether a model family expects BOS at the start of every window.

    Args:
        tokenizer_or_config: A model, a config, or a tokenizer.

    Returns:
        True for Gemma-family models (``model_type`` starting with ``"gemma"``); False
        for the rest, which were measured without BOS (e.g. SmolLM2/Llama).
    """
    obj = tokenizer_or_config
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        return model_type.lower().startswith("gemma")
    # Tokenizers carry no model_type, but one loaded from a checkpoint folder sits next
    # to that folder's config.json; failing that, the class or source path names it.
    source = str(getattr(obj, "name_or_path", "") or "")
    config_file = Path(source) / "config.json" if source else None
    if config_file is not None and config_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
            if isinstance(model_type, str):
                return model_type.lower().startswith("gemma")
    return any("gemma" in hint.lower() for hint in (type(obj).__name__, source))


def _bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("add_bos requested but the tokenizer has no BOS token")
    return int(bos)


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str, add_bos: bool | None = None
) -> torch.Tensor:
    """Tokenize a whole text once into one stream of token ids.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The text.
        add_bos: Prepend one BOS to the stream. ``None`` decides by :func:`needs_bos`.
            The window functions never double a leading BOS, so a stream built this way
            can still be given ``bos_id``.

    Returns:
        A 1-D ``torch.long`` tensor of token ids.
    """
    if add_bos is None:
        add_bos = needs_bos(tokenizer)
    # verbose=False: the "longer than model_max_length" warning is meaningless here,
    # the stream is cut into windows afterwards.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if add_bos:
        ids = [_bos_id(tokenizer), *ids]
    return torch.tensor(ids, dtype=torch.long)


def _body(tokens: torch.Tensor, seqlen: int, bos_id: int | None) -> tuple[torch.Tensor, int]:
    """Return the text stream and the number of text tokens per window.

    When BOS is added per window, a BOS already leading the stream is dropped so that
    the first window does not start with two.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seqlen < (2 if bos_id is not None else 1):
        raise ValueError(f"seqlen must be at least {2 if bos_id is not None else 1}")
    if bos_id is None:
        return tokens, seqlen
    if tokens.numel() and int(tokens[0]) == bos_id:
        tokens = tokens[1:]
    return tokens, seqlen - 1


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    bos = torch.full((windows.shape[0], 1), bos_id, dtype=torch.long)
    return torch.cat([bos, windows], dim=1)


def calibration_windows(
    tokens: torch.Tensor, n: int, seqlen: int, seed: int, bos_id: int | None = None
) -> torch.Tensor:
    """Draw ``n`` windows at uniformly random start positions.

    Follows SVD-LLM / ZS-SVD and the AUSTEN-512 protocol: every start drawn in one call,
    ``torch.randint(0, len - seqlen + 1, (n,), generator=torch.Generator().manual_seed(seed))``
    (the same starts as ``torch.manual_seed(seed)`` then ``torch.randint``), so the same seed
    gives the same windows as the official code. Windows may overlap.

    Args:
        tokens: 1-D token stream.
        n: Number of windows.
        seqlen: Tokens per window (including BOS when ``bos_id`` is given).
        seed: Seed of the ``torch.Generator``.
        bos_id: If given, every window is BOS followed by ``seqlen - 1`` text tokens.

    Returns:
        ``(n, seqlen)`` long tensor.

    Raises:
        ValueError: The text is too short for one window, or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    body, width = _body(tokens, seqlen, bos_id)
    high = body.numel() - width + 1   # exclusive bound: the last full window may be drawn
    if high < 1:
        raise ValueError(
            f"text has {body.numel()} tokens; calibration windows of {seqlen} tokens "
            f"need at least {width}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, high, (n,), generator=generator).tolist()
    windows = torch.stack([body[s : s + width] for s in starts])
    return _with_bos(windows, bos_id)


def evaluation_windows(
    tokens: torch.Tensor, seqlen: int, k: int | None, bos_id: int | None = None
) -> torch.Tensor:
    """Cut the stream into consecutive non-overlapping windows from token 0.

    Args:
        tokens: 1-D token stream.
        seqlen: Tokens per window (including BOS when ``bos_id`` is given).
        k: Number of windows to take (the first ``k``); ``None`` takes every full window.
        bos_id: If given, every window is BOS followed by the next ``seqlen - 1`` tokens.

    Returns:
        ``(k, seqlen)`` long tensor.

    Raises:
        ValueError: The text is shorter than one window, or than ``k`` windows.
    """
    body, width = _body(tokens, seqlen, bos_id)
    available = body.numel() // width
    wanted = available if k is None else k
    if wanted < 1 or available < wanted:
        needed = width * max(wanted, 1)
        raise ValueError(
            f"text has {body.numel()} tokens; {max(wanted, 1)} evaluation window(s) of "
            f"{seqlen} tokens need {needed}"
        )
    windows = body[: wanted * width].reshape(wanted, width)
    return _with_bos(windows, bos_id)


def load_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str,
    role: Role,
    n_or_k: int | None,
    seqlen: int,
    seed: int = 0,
    add_bos: bool | None = None,
) -> torch.Tensor:
    """Load a text source and cut it into windows in one call.

    Args:
        tokenizer: The model's tokenizer.
        spec: A text source (see :func:`lowrank.data.load_text`).
        role: ``"calibration"`` (random windows) or ``"evaluation"`` (consecutive ones).
        n_or_k: Number of windows (``None`` for all, evaluation only).
        seqlen: Tokens per window.
        seed: Seed for calibration windows (ignored for evaluation).
        add_bos: Start every window with BOS; ``None`` decides by :func:`needs_bos`.

    Returns:
        ``(windows, seqlen)`` long tensor.
    """
    use_bos = needs_bos(tokenizer) if add_bos is None else add_bos
    bos_id = _bos_id(tokenizer) if use_bos else None
    tokens = tokenize_text(tokenizer, load_text(spec, role), add_bos=False)
    if role == "calibration":
        if n_or_k is None:
            raise ValueError("calibration needs a number of windows")
        return calibration_windows(tokens, n_or_k, seqlen, seed, bos_id)
    return evaluation_windows(tokens, seqlen, n_or_k, bos_id)
