"""Fixtures of the bad-input tests: tiny models saved with a byte tokenizer, a text file, the CLI.

Everything is small (tests/tiny_models.py's configs, a 256-token byte-level tokenizer) so that a
row of docs/bad-input.md costs well under a second to check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner
from tiny_models import build, calibration

import lowrank
from lowrank.cli import main

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


def byte_tokenizer():
    """A 256-token byte-level BPE tokenizer with no merges (built in memory, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_model(arch: str = "llama", seed: int = 0):
    """tests/tiny_models.py's model with its vocabulary resized to the byte tokenizer."""
    tokenizer = byte_tokenizer()
    model = build(arch, seed=seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model, tokenizer


def save_plain(folder: Path, arch: str = "llama") -> Path:
    """An ordinary (uncompressed) checkpoint with its tokenizer."""
    model, tokenizer = tiny_model(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_compressed(folder: Path, arch: str = "llama", exporter: str = "hf", ratio: float = 0.3) -> Path:
    """A compressed checkpoint (whitening, uniform) with its tokenizer."""
    model, tokenizer = tiny_model(arch)
    ids = calibration(4, 16) % len(tokenizer)
    lowrank.compress(model, lowrank.Recipe(ratio=ratio, exporter=exporter, device="cpu"), ids, progress=False)
    return lowrank.save(model, folder, tokenizer=tokenizer)


def copy_of(source: Path, folder: Path) -> Path:
    """A copy of a checkpoint directory, to damage."""
    shutil.copytree(source, folder)
    return folder


def edit_config(folder: Path, edit) -> None:
    """Apply ``edit(config_dict)`` to ``folder/config.json``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def truncate(path: Path, keep: int) -> None:
    """Cut a file to its first ``keep`` bytes (a copy that stopped half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


def text_file(folder: Path, text: str = TEXT) -> Path:
    """A UTF-8 text file for ``file:`` sources."""
    path = folder / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, env: dict[str, str] | None = None):
    """Run the CLI in-process; ``result.stdout`` / ``result.stderr`` are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_paragraph(stderr: str) -> bool:
    """No traceback anywhere, and the error (the last thing on stderr, after any progress bar) is
    one paragraph: ``Error: ...`` with no blank line."""
    start = stderr.rfind("Error: ")
    error = stderr[start:].strip()
    return "Traceback" not in stderr and start >= 0 and "\n\n" not in error and error.count("Error: ") == 1


def snapshot(model) -> dict[str, torch.Tensor]:
    """The model's tensors and module types, to compare after a failure."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["__types__"] = [type(m).__name__ for m in model.modules()]  # type: ignore[assignment]
    return state


def unchanged(model, snap) -> bool:
    """The model's tensors and module types are what :func:`snapshot` recorded."""
    now = snapshot(model)
    if now.keys() != snap.keys() or now["__types__"] != snap["__types__"]:
        return False
    return all(torch.equal(now[k], snap[k]) for k in snap if k != "__types__")


def nothing_written(parent: Path, keep: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
    """Nothing but ``keep`` in ``parent``: no output directory, no hidden partial one."""
    return {p.name for p in parent.iterdir()} <= set(keep)
