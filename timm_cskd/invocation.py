"""How the user invoked a tool, for its usage line and errors: ``timm-cskd evaluate`` when the
``timm-cskd`` dispatcher runs it (``train_imagenet.py`` when that checkout script runs the trainer), else
the tool's own spelling (``python -m timm_cskd.evaluate``)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["invoked_as", "program_name"]

_INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("timm_cskd_invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(command: str) -> Iterator[None]:
    """Within the block, :func:`program_name` answers ``command``."""
    token = _INVOKED_AS.set(command)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def program_name(direct: str) -> str:
    """A tool's argparse ``prog``: the dispatcher's command while it runs the tool, else ``direct``."""
    return _INVOKED_AS.get() or direct
