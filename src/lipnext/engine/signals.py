"""Ctrl-C and SIGTERM during training: stop at the next step boundary, after a checkpoint.

The first SIGINT or SIGTERM only records the request (the step in progress finishes, the
trainer writes a checkpoint atomically and returns); the previous handlers are then back,
so a second signal stops the process at once (the last complete checkpoint stays intact).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

__all__ = ["StopOnSignal"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """``install()`` … ``restore()``: ``.signal`` is the name of the first signal received, else None."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():   # handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        self.restore()

    def restore(self) -> None:
        """The handlers from before ``install()`` (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
