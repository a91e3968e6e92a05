"""Data-loading worker processes that survive a scheduler's SIGTERM but never outlive their trainer.

SLURM preemption, ``scancel`` and ``kill -- -PGID`` signal the whole process group: a loader worker
that died of it would make the trainer raise before it saves its preemption checkpoint. Ignoring the
signal outright is not enough either: Python's multiprocessing, torch's DataLoader and DALI all stop
their workers with SIGTERM from the parent (at interpreter exit among others), and a worker deaf to it
hangs that exit forever. So a worker keeps SIGTERM blocked and one thread takes it with
``sigtimedwait``: from its parent it exits, from anyone else it is dropped. The same thread leaves
when the parent is gone (a SIGKILLed or crashed trainer).

Workers must start with SIGTERM already blocked (``stop_signal_blocked`` around their start; the mask
survives fork and exec), or one arriving while a worker starts up kills it first.

Processes whose threads we do not create (DALI's spawned readers: spawning resets the signal mask and
their threads start before our code runs, so no one thread can take SIGTERM) ignore it outright instead;
DALI's own pool shutdown stops them, and they leave by themselves when the trainer is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

__all__ = ["become_deaf_worker", "become_worker", "stop_signal_blocked"]

STOP = signal.SIGTERM
# How often the watcher notices a vanished parent.
PARENT_CHECK_S = 1.0


@contextlib.contextmanager
def stop_signal_blocked():
    """Block SIGTERM in the calling thread while worker processes start; one that arrives meanwhile is
    delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def become_deaf_worker() -> None:
    """In a worker with threads of its own: ignore SIGTERM, and exit with the parent."""
    signal.signal(STOP, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent, args=(os.getppid(),), name="timm-cskd-parent-watch", daemon=True
    ).start()


def _watch(parent: int) -> None:
    while True:
        info = signal.sigtimedwait({STOP}, PARENT_CHECK_S)
        if (info is not None and info.si_pid == parent) or os.getppid() != parent:
            os._exit(0)


def become_worker() -> None:
    """In a freshly started worker: take SIGTERM only from the parent, and exit with the parent."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP})
    signal.signal(STOP, signal.SIG_DFL)  # an ignored signal would be discarded before the watcher sees it
    threading.Thread(target=_watch, args=(os.getppid(),), name="timm-cskd-worker-watch", daemon=True).start()
