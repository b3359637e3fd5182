"""What a user keeps from a certification: a results dict, a printed table, a plot."""
from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .certify import Certificate
from .io import atomic_write

__all__ = ["results_dict", "format_table", "plot_certified_accuracy", "write_json"]


def results_dict(cert: Certificate, eps: Sequence[float], labels: Sequence[str] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Clean accuracy, CRA at each eps, the bound, the rule and how the radii were computed
    (``numerics``: "float64-proven" for certificates), as plain JSON types."""
    labels = list(labels) if labels is not None else [f"{e:g}" for e in eps]
    return {"n": len(cert), "clean_accuracy": cert.accuracy,
            "cra": {lab: cert.cra(float(e)) for lab, e in zip(labels, eps)},
            "eps": {lab: float(e) for lab, e in zip(labels, eps)},
            "lipschitz_bound": cert.lipschitz, "rule": cert.rule, "numerics": cert.numerics,
            "range_limited": int(cert.range_limited.sum()), **extra}


def format_table(results: dict[str, Any]) -> str:
    """A small aligned text table of a results dict (percentages)."""
    rows = [("clean accuracy", f"{100 * results['clean_accuracy']:.1f}%")]
    rows += [(f"CRA @ eps={lab}", f"{100 * v:.1f}%") for lab, v in results["cra"].items()]
    rows += [("Lipschitz bound L", f"{results['lipschitz_bound']:.6f}"),
             ("certificate rule", results["rule"]), ("test points", str(results["n"]))]
    if results.get("numerics", "float64-proven") != "float64-proven":      # never from certify
        rows.append(("NOT CERTIFICATES", str(results["numerics"])))
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 14)
    return "\n".join([line] + [f"{k:<{w}}  {v:>10}" for k, v in rows] + [line])


def plot_certified_accuracy(cert: Certificate, path: str | Path, title: str = "",
                            marks: Sequence[float] = (), mark_labels: Sequence[str] | None = None) -> Path:
    """Certified accuracy as a function of the radius eps, saved as an image; each radius in
    ``marks`` is a dotted line labelled with ``mark_labels`` (default: its value) and its CRA."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = cert.radius[cert.correct].double().sort().values
    n = len(cert)
    top = max([float(r.max()) if r.numel() else 0.0, *marks]) * 1.05 or 1.0
    grid = torch.linspace(0, top, 400, dtype=torch.float64)
    acc = [(r > e).sum().item() / n for e in grid]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(grid.numpy(), acc, lw=2)
    labels = list(mark_labels) if mark_labels is not None else [f"{e:g}" for e in marks]
    for e, label in zip(marks, labels):
        cra = cert.cra(float(e))
        ax.axvline(e, color="grey", ls=":", lw=1)
        ax.plot([e], [cra], "o", ms=3, color="dimgrey")
        # the curve never falls to the upper right of (e, CRA), nor rises to its lower left:
        # the label goes there (lower left near the top or the right edge)
        high = cra > 0.85 or (e > 0.7 * top and cra > 0.15)
        ax.annotate(f"{label}: {100 * cra:.1f}%", (e, cra), xytext=(-3, -3) if high else (3, 3),
                    textcoords="offset points", ha="right" if high else "left",
                    va="top" if high else "bottom", fontsize=7, color="dimgrey",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set(xlabel="L2 radius eps", ylabel="certified accuracy", ylim=(0, 1), xlim=(0, top))
    head = textwrap.fill(title, 60) if title else "certified accuracy"
    ax.set_title(f"{head}\nL = {cert.lipschitz:.4f}, rule {cert.rule}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
