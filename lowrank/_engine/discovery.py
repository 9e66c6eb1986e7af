"""Finding the decoder blocks and the targeted linear layers of a Hugging Face causal LM.

Nothing here knows an architecture by name: the blocks are the ``nn.ModuleList`` whose length is
the config's number of layers, and a target is any ``nn.Linear`` (or GPT-2's ``Conv1D``, which
stores its weight transposed) inside a block whose name matches the recipe's patterns.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from torch import nn

from .._contract.errors import CompressionError
from .._contract.layers import LowRankLinear
from .._contract.model import Target, is_linear, num_layers, weight_of

__all__ = ["find_blocks", "find_targets", "matches"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of ``num_hidden_layers`` modules that hold linear layers."""
    n = num_layers(model)
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    for name, mod in lists:
        if (n is None or len(mod) == n) and any(is_linear(m) or isinstance(m, LowRankLinear) for m in mod[0].modules()):
            return name, mod
    seen = ", ".join(f"{name or '(root)'} ({len(mod)} x {type(mod[0]).__name__})" for name, mod in lists[:6])
    raise CompressionError(
        f"unsupported architecture {type(model).__name__}: lowrank looks for its decoder blocks as an "
        f"nn.ModuleList of {n if n is not None else 'num_hidden_layers (not in the config)'} modules "
        "(the config's num_hidden_layers, n_layer or num_layers) whose first one holds nn.Linear or "
        f"transformers Conv1D layers, and found {'only: ' + seen if seen else 'no nn.ModuleList at all'}. "
        "Nothing was changed"
    )


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``re:`` patterns are regular expressions (searched); others are shell globs on the full name
    or on its last component."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p):
            return True
    return False


def find_targets(model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str], *,
                 blocks: tuple[str, nn.ModuleList] | None = None) -> list[Target]:
    """Every linear layer inside a decoder block that matches ``targets`` (default: all) and not
    ``ignore``. A pattern list that matches nothing is an error listing what exists.

    ``blocks`` is what :func:`find_blocks` returned, when the caller has it already.
    """
    prefix, blocks = blocks if blocks is not None else find_blocks(model)
    found: list[Target] = []
    candidates: list[str] = []
    for i, block in enumerate(blocks):
        for local, module in block.named_modules():
            if not local or not is_linear(module):
                continue
            full = f"{prefix}.{i}.{local}"
            candidates.append(full)
            if targets is not None and not matches(full, targets):
                continue
            if matches(full, ignore):
                continue
            w = weight_of(module)
            found.append(Target(full, i, local, (int(w.shape[0]), int(w.shape[1]))))
    if not found:
        locals_ = sorted({c.split(f"{prefix}.", 1)[1].split(".", 1)[1] for c in candidates})
        raise CompressionError(
            f"the target patterns {list(targets) if targets is not None else '(default)'} "
            f"(ignore {list(ignore)}) match no linear layer in the decoder blocks. Linear layers in "
            f"each block: {', '.join(locals_) or 'none'} (full names look like {candidates[0] if candidates else prefix + '.0.<name>'})."
            " Patterns are globs on the full or last name, or 're:' regular expressions."
        )
    return found
