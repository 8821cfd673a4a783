"""Stopping a long run cleanly: SIGINT and SIGTERM set a flag that the batch loop checks between batches.

A second signal stops at once (KeyboardInterrupt). The loop that reads the flag raises
``scanning.passes.Interrupted``; the CLI turns that into its message and exit code.
"""

from __future__ import annotations

import signal


class StopFlag:
    """SIGINT/SIGTERM set a flag the scan loop checks between batches."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self) -> int | None:
        return self.signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
