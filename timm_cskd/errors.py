"""The error every layer raises for a configuration that cannot run.

The command line (``timm_cskd.cli``) prints it as ``error: ...`` and exits 2 without a traceback; it lives
here, below every module that raises it, so a low layer never imports the flag table to refuse a value.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot run."""
