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

    def _handle(self, signum, frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __exit__(self, *exc):
        # None: the previous handler was not set from Python and cannot be restored from it.
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
