"""An advisory lock on an experiment folder, held for a training run's life.

A job re-submitted while the first still runs, or ``--resume auto`` started twice, would otherwise have
two trainers overwrite each other's checkpoints. ``flock`` locks belong to the open file: the kernel
drops them when the holder exits, is killed or its node reboots, so a stale lock from a killed run never
blocks the next one, and no pid-file guesswork is needed. The file records who holds it, for the error.
On network file systems flock is as reliable as the mount's lock support (NFSv4: yes).

A forked child (a DataLoader worker) shares the lock's open file: ``close_inherited()`` in the child
drops its copy, so a killed trainer's lock is free at once, not when its last worker notices.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "close_inherited"]

LOCK_NAME = ".run.lock"
# How long to wait for a lock whose recorded holder is dead on this host: a forked child of that
# holder (one we could not make drop its copy) still holds it until it notices and exits.
ORPHAN_GRACE_S = 30.0

_held_fds: set[int] = set()


def close_inherited() -> None:
    """In a forked child: close the inherited lock files without unlocking them (the parent holds on)."""
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLockedError(RuntimeError):
    """Another live process holds the experiment folder."""


class RunLock:
    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _orphaned(self, info: dict) -> bool:
        return (
            info.get("host") == socket.gethostname()
            and isinstance(info.get("pid"), int)
            and not _alive(info["pid"])
        )

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self._orphaned(self.holder()) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
            os.close(fd)
            info = self.holder()
            since = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
            )
            raise RunLockedError(
                f"{self.path.parent} is in use by another run (pid {info.get('pid', '?')} on host "
                f"{info.get('host', '?')}, since {since}: {info.get('command', '?')}); wait for it to end, "
                "stop it, or pick another --experiment"
            ) from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _held_fds.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _held_fds.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
