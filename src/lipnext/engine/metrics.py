"""What a run records (rank 0 only): metrics as JSON lines (``<run>/metrics.jsonl``), if the
``tensorboard`` package is installed TensorBoard events (``<run>/tensorboard``), and the same
scalars in the trackers that ``log.wandb`` / ``log.mlflow`` switch on (``lipnext.trackers``)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write, write_error
from ..trackers import Tracker, scalars

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only metrics; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None,
                 trackers: Sequence[Tracker] = ()):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.trackers = list(trackers)
        if not enabled:
            return
        if resume_step is None:
            atomic_write(self.path, lambda t: Path(t).write_text(""))
        else:
            self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed: metrics go to metrics.jsonl only "
                      "(pip install 'lipnext[log]')")
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        self._fh = open(self.path, "a")

    def _truncate(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write(self.path, lambda t: Path(t).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback replays those steps)."""
        if not self.enabled:
            return
        self._fh.close()
        self._truncate(step)
        self._fh = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as e:                   # a full disk: say which file
            raise write_error(e, self.path) from None
        values, step = scalars(record), record.get("step", 0)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log_scalars(values, step)

    def artifacts(self, paths: Sequence[Path]) -> None:
        """Hand files (the model card, results.json) to the trackers."""
        if self.enabled:
            for tracker in self.trackers:
                tracker.log_artifacts(paths)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
