"""Where a benchmark's results go: ``<name>.json`` (the run's facts, ``"complete": false``
until the last row, the rows) and ``<name>.md`` (its table), both rewritten atomically after
each row, so that an interrupted run keeps what it measured."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = ["run_facts", "write_results"]


def run_facts(**facts: Any) -> dict[str, Any]:
    """The date (UTC) and torch version of this run, with ``facts``."""
    import torch
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            **facts}


def write_results(out_dir: str | Path, name: str, facts: dict[str, Any], rows: list[dict[str, Any]],
                  table: str, complete: bool) -> str:
    """Write ``name``.json and ``name``.md into ``out_dir``; return the table."""
    out = Path(out_dir)
    payload = json.dumps({**facts, "complete": complete, "results": rows}, indent=2)
    atomic_write(out / f"{name}.json", lambda p: Path(p).write_text(payload))
    atomic_write(out / f"{name}.md", lambda p: Path(p).write_text(table))
    return table
