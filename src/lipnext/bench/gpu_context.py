"""What a stage of the GPU check (``bench.gpu``) writes as it runs: its figures and its checks,
rewritten to ``<out>/stage_<name>.json`` after each one, so that a stage stopped at the deadline
still reports what it measured. ``--smoke`` runs the same code at tiny sizes on the CPU."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..io import atomic_write

__all__ = ["StageContext"]

T = TypeVar("T")


@dataclass
class StageContext:
    """One stage's record: ``record`` figures, ``check`` claims (a failed check fails the stage)."""

    path: Path
    smoke: bool
    device: torch.device
    results: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def size(self, gpu: T, smoke: T) -> T:
        """The GPU size, or the tiny one under ``--smoke``."""
        return smoke if self.smoke else gpu

    def record(self, **figures: Any) -> None:
        self.results.update(figures)
        self._write()

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        self._write()
        return bool(ok)

    @contextmanager
    def part(self, name: str) -> Iterator[dict[str, Any]]:
        """A dict recorded under ``name`` when the block ends, and on the way out of an error."""
        figures: dict[str, Any] = {}
        try:
            yield figures
        finally:
            self.record(**{name: figures})

    def _write(self) -> None:
        payload = json.dumps({"results": self.results, "checks": self.checks}, indent=1, default=str)
        atomic_write(self.path, lambda p: Path(p).write_text(payload))
