"""Atomic file writes: a temporary file beside the target, renamed over it (``os.replace``), so a reader
(a second study, a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "write_atomic"]


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, durable: bool = False, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on an error it
    is removed. ``durable``: fsync the file and its folder (checkpoints). The name holds the host and pid,
    so processes on several nodes sharing the folder never write the same temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
