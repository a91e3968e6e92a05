"""Where configs come from: ``-c NAME`` (no ``.yaml``, no folder, not a file here) names a recipe shipped in
the package (``timm_cskd/configs/``), so an installed wheel runs them from any folder."""

from __future__ import annotations

import os
from pathlib import Path

from timm_cskd.errors import ConfigError

__all__ = ["CONFIG_DIR", "DEMO_CONFIG", "config_names", "resolve_config"]

# The recipes shipped as package data; the repository's top-level configs/ links to this folder.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"  # what the trainer runs with neither --config nor --data-dir


def config_names() -> list[str]:
    """The packaged configs' names, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(ref: str | os.PathLike) -> Path:
    """The file ``ref`` means: an existing file or any path as given (a missing one is reported by its
    reader), else a packaged config's name; a name that is not packaged is an error listing those that are."""
    path = Path(ref)
    text = str(ref)
    is_name = text and not text.endswith((".yaml", ".yml")) and "/" not in text and os.sep not in text
    if path.is_file() or not is_name:
        return path
    packaged = CONFIG_DIR / f"{text}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"config '{text}' is neither a file nor a packaged config; packaged: {', '.join(config_names())}"
    )
