"""Comparing runs: one table (Markdown, CSV) and one plot of CRA against the radius.

``find_runs(paths)``: each path is a finished run folder (it has results.json) or a folder
searched for them (a study's output, say). ``compare_rows(runs)``: per run, from its model
card (``lipnext.card.build_card``): model, parameters, data track (real, or real +
generated), epochs, wall time, clean accuracy, CRA at each eps and the Lipschitz bound.
The plot draws each run's certified accuracy as a function of the radius from its per-image
certificates (``certificates.npz``, written at the end of training and by
``lipnext certify RUN --per-sample``); a run without them shows its CRA at the eps only.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from .io import atomic_write

__all__ = ["find_runs", "compare_rows", "format_markdown", "write_compare", "plot_compare"]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The finished run folders among ``paths`` and below them, each once, in order."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no run folder at {p}")
        found = [p] if (p / "results.json").is_file() else sorted(q.parent for q in p.rglob("results.json"))
        if not found:
            raise ValueError(f"{p} holds no finished run (no results.json in it or below it)")
        runs += [r for r in found if r not in runs]
    return runs


def _track(card: dict[str, Any]) -> str:
    gen = card["generated_data"]
    if not card["additional_data"]:
        return "real"
    return f"real + generated ({gen['real_to_generated']})" if gen else "real + generated"


def compare_rows(runs: list[Path]) -> list[dict[str, Any]]:
    """One row per run (module doc); ``cra`` maps each eps label to its CRA."""
    from .card import build_card

    rows = []
    for run in runs:
        card = build_card(run)
        rows.append({"run": str(run), "model": card["model"], "params": card["parameters"],
                     "data": card["dataset"], "track": _track(card), "epochs": card["recipe"]["epochs"],
                     "wall_s": card["hardware"]["wall_s"], "clean": card["clean_acc"],
                     "cra": card["certified_acc"] or {}, "eps": card["eps"], "bound": card["lipschitz_bound"]})
    return rows


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    """Every eps label of the rows, by eps."""
    eps = {lab: e for r in rows for lab, e in r["eps"].items()}
    return sorted(eps, key=lambda lab: eps[lab])


def _cells(r: dict[str, Any], labels: list[str]) -> list[str]:
    pct = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    return [r["run"], r["model"], f"{r['params']:,}", r["track"], str(r["epochs"]),
            "" if r["wall_s"] is None else f"{r['wall_s']:.0f}", pct(r["clean"]),
            *(pct(r["cra"].get(lab)) for lab in labels), "" if r["bound"] is None else f"{r['bound']:.6f}"]


def _header(labels: list[str]) -> list[str]:
    return ["run", "model", "params", "data track", "epochs", "wall s", "clean %",
            *(f"CRA@{lab} %" for lab in labels), "bound L"]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    labels = _labels(rows)
    head = _header(labels)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r, labels)) + " |" for r in rows]) + "\n"


def plot_compare(rows: list[dict[str, Any]], path: Path) -> Path:
    """Certified accuracy against the radius, one line per run (module doc)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .card import SAMPLES_NAME
    from .samples import read_per_sample

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    top = max([e for r in rows for e in r["eps"].values()] or [1.0]) * 1.25
    for r in rows:
        name = Path(r["run"]).name
        samples = Path(r["run"]) / SAMPLES_NAME
        if samples.is_file():
            s = read_per_sample(samples)
            radius = np.where(s["margin"] > 0, s["radius"], 0.0)
            grid = np.linspace(0, top, 400)
            ax.plot(grid, [(radius > g).mean() for g in grid], lw=1.8, label=name)
        elif r["cra"]:
            pts = sorted((r["eps"][lab], v) for lab, v in r["cra"].items())
            ax.plot(*zip(*pts), "o--", lw=1, label=f"{name} (CRA at eps only)")
    ax.set(xlabel="L2 radius eps", ylabel="certified accuracy", xlim=(0, top), ylim=(0, 1))
    ax.set_title("certified accuracy against the radius", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_compare(rows: list[dict[str, Any]], out: str | Path) -> dict[str, Path]:
    """compare.md, compare.csv and compare.png in ``out``."""
    out = Path(out)
    labels = _labels(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_header(labels))
    w.writerows(_cells(r, labels) for r in rows)
    md = format_markdown(rows)
    paths = {"md": atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(md)),
             "csv": atomic_write(out / "compare.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))}
    paths["png"] = plot_compare(rows, out / "compare.png")
    return paths
