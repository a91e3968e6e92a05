"""The study's error: a ``ConfigError``, so the command line prints it as ``error: ...`` with exit 2."""

from __future__ import annotations

from timm_cskd.config import ConfigError

__all__ = ["StudyError"]


class StudyError(ConfigError):
    """The study cannot run as described; the message names the file, flag or cell at fault."""
