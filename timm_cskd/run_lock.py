"""An advisory lock on an experiment folder, held for a training run's life.

A job re-submitted while the first still runs, or ``--resume auto`` started twice, would otherwise have
two trainers overwrite each other's checkpoints. ``flock`` locks belong to the open file: the kernel
drops them when the holder exits, is killed or its node reboots, so a stale lock from a killed run never
blocks the next one, and no pid-file guesswork is needed. The file records who holds it, for the error.
On NFSv4 a lock held by a node that died stays until the server's lease expires (about 90 s): a
holder on another host is waited for that long. File systems without flock (Lustre mounted ``noflock``)
run unlocked, with a warning.

A forked child (a DataLoader worker) shares the lock's open file: ``close_inherited()`` in the child
drops its copy, so a killed trainer's lock is free at once, not when its last worker notices.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "close_inherited"]

LOCK_NAME = ".run.lock"
# How long to wait for a lock whose recorded holder is dead on this host (a forked child of that holder
# we could not make drop its copy holds it until it notices and exits), or lives on another host (a dead
# node's NFSv4 lock lasts until the server's lease expires).
ORPHAN_GRACE_S = 30.0
REMOTE_GRACE_S = 150.0
# flock errors that mean "this file system has no locks", not "someone holds it".
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)

_held_fds: set[int] = set()
_logger = logging.getLogger(__name__)


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

    def _grace(self, info: dict) -> float:
        """Seconds worth waiting for the recorded holder's lock to go: 0 for a live local process."""
        if info.get("host") != socket.gethostname():
            return REMOTE_GRACE_S
        pid = info.get("pid")
        return ORPHAN_GRACE_S if isinstance(pid, int) and not _alive(pid) else 0.0

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._wait_for_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return
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

    def _wait_for_lock(self, fd: int) -> bool:
        """True once locked, False on a file system without locks; raises while another run holds it."""
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                info = self.holder()
                if time.monotonic() - start < self._grace(info):
                    time.sleep(0.5)
                    continue
                raise self._locked_error(info) from None
            except OSError as e:
                if e.errno not in NO_LOCKS:
                    raise
                _logger.warning(
                    "%s: this file system has no flock (%s); running without protection against a second "
                    "run in the same experiment folder",
                    self.path.parent,
                    os.strerror(e.errno),
                )
                return False

    def _locked_error(self, info: dict) -> RunLockedError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
        return RunLockedError(
            f"{self.path.parent} is in use by another run (pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')}, since {since}: {info.get('command', '?')}); wait for it to end, stop "
            f"it, or pick another --experiment (if that run's node is gone for good, delete {self.path})"
        )

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
