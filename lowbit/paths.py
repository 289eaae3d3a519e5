"""Where lowbit keeps derived files (assembled GGUFs, de-quantized float models)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LOWBIT_CACHE, else $XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit (created on demand)."""
    root = os.environ.get("LOWBIT_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path
