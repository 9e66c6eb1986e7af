"""The toolkit's cache root, shared by the test-bed data and by plugins that cache measurements."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache root: ``$LOWRANK_CACHE`` or ``~/.cache/lowrank`` (not created by this call)."""
    env = os.environ.get("LOWRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowrank"
