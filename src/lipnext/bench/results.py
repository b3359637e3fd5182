"""Where a benchmark's results go: ``<name>.json`` (the run's facts, ``"complete": false``
until the last row, the rows) and ``<name>.md`` (its table), both rewritten atomically after
each row, so that an interrupted run keeps what it measured; and how repeated measurements are
reported (``summarize``: the median of every figure with its min-max, ``spread``)."""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = ["run_facts", "spread", "summarize", "write_results"]


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


def summarize(rows: Sequence[dict[str, Any]], identity: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct ``identity`` (in first-seen order) from rows measured ``repeats``
    times: every number is the median over its repeats, with ``<key>_range`` = [min, max], and
    ``repeats`` = how many. Other values are the first row's."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in identity), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0], repeats=len(group))
        for key, value in group[0].items():
            values = [g.get(key) for g in group]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in identity \
                    and all(isinstance(v, (int, float)) for v in values):
                row[key] = statistics.median(values)
                row[f"{key}_range"] = [min(values), max(values)]
        out.append(row)
    return out


def spread(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    """``fmt(median)``, and " (min-max)" when the repeats differ."""
    lo, hi = row.get(f"{key}_range", (row[key], row[key]))
    return fmt(row[key]) if fmt(lo) == fmt(hi) else f"{fmt(row[key])} ({fmt(lo)}-{fmt(hi)})"
