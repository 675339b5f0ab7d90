"""herl's home folder: installed models and the vLLM environment live under it."""

from __future__ import annotations

import os
from pathlib import Path


def herl_home() -> Path:
    """$HERL_HOME, else ~/.cache/herl."""
    return Path(os.environ.get("HERL_HOME", Path.home() / ".cache" / "herl"))
