"""Names for the things the package prints and the folders it makes: durations as ``H:MM:SS`` (the
trainer's ETA, a study's cell times) and labels as folder names (a study's cells, figures' folders)."""

from __future__ import annotations

import re

__all__ = ["format_duration", "slug"]


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``"1:02:05"``; negative durations are ``0:00:00``."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def slug(text: str) -> str:
    """A label as a folder or file name: each run of characters other than letters, digits and ``.=+-``
    becomes ``_``. A study finds its cells again by these names, so the rule never changes."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "_"
