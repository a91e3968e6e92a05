"""SIGTERM as a request to stop: a scheduler's preemption notice (``kill PID``, SLURM, Kubernetes) sets a
flag the holder checks between steps, and is passed on to the child process it waits for, if any."""

from __future__ import annotations

import signal
import subprocess
import threading

__all__ = ["STOP_SIGNALS", "StopFlag"]

STOP_SIGNALS = (signal.SIGTERM,)


class StopFlag:
    """While entered, a stop signal sets ``requested`` (and reaches ``child`` if it is running)."""

    def __init__(self):
        self.requested = False
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere the signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def watch(self, child: subprocess.Popen | None) -> None:
        """Pass stop signals on to ``child`` from now on (None: to nobody); one that arrived while it was
        starting is passed on at once."""
        self.child = child
        if child is not None and self.requested and child.poll() is None:
            child.send_signal(STOP_SIGNALS[0])

    def _handle(self, signum, frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __exit__(self, *exc):
        # None: the previous handler was installed outside Python; the default is the closest to it
        # (leaving ours would turn a later SIGTERM into a flag nobody reads).
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
