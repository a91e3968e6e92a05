"""The study's errors, each printed by its command line as ``error: ...`` with exit 2."""

from __future__ import annotations

from timm_cskd.errors import ConfigError

__all__ = ["ReportError", "StudyError"]


class StudyError(ConfigError):
    """The study cannot run as described; the message names the file, flag or cell at fault."""


class ReportError(ValueError):
    """The study folder cannot be read; the message names the file."""
