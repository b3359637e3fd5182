"""Progress that suits where the output goes: a tqdm bar on a terminal, one line now and then
in a log file or a pipe (a bar there is a flood of carriage returns).

``progress(total, desc, enabled)`` returns either a ``tqdm`` bar or a :class:`LineProgress`,
which has the part of tqdm's interface that lipnext uses (``update``, ``n``, ``set_postfix``,
``set_postfix_str``, ``write``, ``close``) and prints ``desc: 120/600 steps (20%), 35 s, ETA 2 min 20 s, loss=1.23 ...`` to
stderr whenever another tenth of the total is done or a minute has passed, and at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["progress", "LineProgress"]


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


class LineProgress:
    """Periodic one-line progress (see the module docstring)."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step",
                 every_s: float = 60.0, file: TextIO | None = None):
        self.total, self.desc, self.n, self.unit, self.every_s = total, desc, initial, unit, every_s
        self.file = file or sys.stderr
        self._start_n, self._t0 = initial, time.perf_counter()
        self._last_t, self._last_tenth, self._last_n = self._t0, self._tenth(initial), initial
        self._postfix = ""

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 10

    def set_postfix(self, **values: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text

    @staticmethod
    def write(text: str) -> None:
        """A message line (to stdout, as ``tqdm.write``)."""
        print(text, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self._tenth(self.n) > self._last_tenth or now - self._last_t >= self.every_s:
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed, done = now - self._t0, self.n - self._start_n
        eta = (f", ETA {_duration(elapsed / done * (self.total - self.n))}"
               if 0 < done and self.n < self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {_duration(elapsed)}{eta}"
              f"{', ' + self._postfix if self._postfix else ''}", file=self.file, flush=True)
        self._last_t, self._last_tenth, self._last_n = now, self._tenth(self.n), self.n

    def close(self) -> None:
        """The last line, if anything happened since the one before."""
        if self.n != self._last_n:
            self._print(time.perf_counter())


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step",
             file: TextIO | None = None, leave: bool = True) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`LineProgress`;
    a disabled tqdm bar (which prints nothing) when not ``enabled``."""
    from tqdm import tqdm

    file = file or sys.stderr
    if enabled and not (hasattr(file, "isatty") and file.isatty()):
        return LineProgress(total, desc, initial, unit, file=file)
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, mininterval=1.0,
                disable=not enabled, file=file, leave=leave)
