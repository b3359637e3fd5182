"""Orthogonal updates compared: the time of one optimizer step that keeps a C x C weight
orthogonal, for LipNeXt's FastExp manifold step and for the peer methods, and of the bare
exponential-type maps on the same skew-symmetric A.

Methods (a fixed random Euclidean gradient G stands in for the data):

* ``lipnext_manifold_adam``: ``lipnext.optim.ManifoldAdam`` step on an OrthogonalParameter
  (Lie-algebra NAdam + X <- X FastExp(-lr D)); the weight is used as is, no re-parameterisation.
* ``fast_exp`` / ``matrix_exp`` / ``cayley``: the maps alone on A with ||A||_F = 0.5
  (FastExp's order-4 Taylor branch, the dearest below its exact fallback; Cayley as
  solve(I - A/2, I + A/2)).
* ``geoopt_radam_stiefel``: geoopt RiemannianAdam step on a ManifoldParameter on the
  Stiefel manifold (retraction-based).
* ``geotorch_orthogonal``, ``torch_orthogonal_matrix_exp``, ``torch_orthogonal_cayley``,
  ``orthogonium_ortholinear``, ``torchlip_spectral_linear``: re-parameterised layers; one
  step = compute the weight from its parameters, back-propagate <W, G> through the
  parameterisation, and take a torch.optim.Adam step.

Peer libraries are optional (``pip install lipnext[bench]``); a missing one is reported
as skipped, not silently dropped.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..io import atomic_write
from ..nn import OrthogonalParameter, random_orthogonal
from ..optim import ManifoldAdam, fast_exp
from .results import run_facts, spread, summarize, write_results
from .timing import median, resolve_device, time_calls

__all__ = ["METHODS", "Method", "orthogonal_step", "run_orthogonal"]

LR = 1e-3


class Method(NamedTuple):
    step: Callable[[], object]           # one timed step
    weight: Callable[[], torch.Tensor]   # the current orthogonal matrix (for tests)


def _skew(c: int, norm: float, device: torch.device) -> torch.Tensor:
    a = torch.randn(c, c, device=device)
    a = a - a.T
    return a * (norm / a.norm())


def _lipnext(c: int, dev: torch.device) -> Method:
    x = OrthogonalParameter(random_orthogonal(c).to(dev))
    opt = ManifoldAdam([x], lr=LR, nesterov=True)
    g = torch.randn(c, c, device=dev)

    def step():
        x.grad = g
        opt.step()
    return Method(step, lambda: x.detach())


def _kernel(kind: str) -> Callable[[int, torch.device], Method]:
    def make(c: int, dev: torch.device) -> Method:
        a = _skew(c, 0.5, dev)
        eye = torch.eye(c, device=dev)
        fn = {"fast_exp": lambda: fast_exp(a), "matrix_exp": lambda: torch.linalg.matrix_exp(a),
              "cayley": lambda: torch.linalg.solve(eye - a / 2, eye + a / 2)}[kind]
        return Method(fn, fn)
    return make


def _geoopt(c: int, dev: torch.device):
    geoopt = importlib.import_module("geoopt")
    x = geoopt.ManifoldParameter(random_orthogonal(c).to(dev), manifold=geoopt.Stiefel())
    opt = geoopt.optim.RiemannianAdam([x], lr=LR)
    g = torch.randn(c, c, device=dev)

    def step():
        x.grad = g.clone()
        opt.step()
    return Method(step, lambda: x.detach())


def _reparam_step(layer: nn.Module, dev: torch.device, c: int):
    layer = layer.to(dev)
    opt = torch.optim.Adam(layer.parameters(), lr=LR)
    g = torch.randn(c, c, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        (layer.weight * g).sum().backward()
        opt.step()
    return Method(step, lambda: layer.weight.detach())


def _geotorch(c: int, dev: torch.device):
    geotorch = importlib.import_module("geotorch")
    layer = nn.Linear(c, c, bias=False)
    geotorch.orthogonal(layer, "weight")
    return _reparam_step(layer, dev, c)


def _torch_orth(kind: str):
    def make(c: int, dev: torch.device):
        from torch.nn.utils.parametrizations import orthogonal
        layer = orthogonal(nn.Linear(c, c, bias=False), orthogonal_map=kind)
        return _reparam_step(layer, dev, c)
    return make


def _orthogonium(c: int, dev: torch.device):
    layers = importlib.import_module("orthogonium.layers")
    return _reparam_step(layers.OrthoLinear(c, c, bias=False), dev, c)


def _torchlip(c: int, dev: torch.device):
    tl = importlib.import_module("deel.torchlip")
    return _reparam_step(tl.SpectralLinear(c, c, bias=False), dev, c)


METHODS: dict[str, Callable[[int, torch.device], Method]] = {
    "lipnext_manifold_adam": _lipnext,
    "fast_exp": _kernel("fast_exp"),
    "matrix_exp": _kernel("matrix_exp"),
    "cayley": _kernel("cayley"),
    "geoopt_radam_stiefel": _geoopt,
    "geotorch_orthogonal": _geotorch,
    "torch_orthogonal_matrix_exp": _torch_orth("matrix_exp"),
    "torch_orthogonal_cayley": _torch_orth("cayley"),
    "orthogonium_ortholinear": _orthogonium,
    "torchlip_spectral_linear": _torchlip,
}


def orthogonal_step(method: str, c: int, device: torch.device) -> Method:
    """``method`` set up on a C x C weight: (step closure, current weight)."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(0)
    return METHODS[method](c, device)


def run_orthogonal(sizes: Sequence[int], out_dir: str | Path, methods: Sequence[str] | None = None,
                   steps: int = 5, warmup: int = 2, device: str = "auto", repeats: int = 3,
                   log: Callable[[str], None] = lambda s: print(s, flush=True)) -> str:
    """Time every method at every size, ``repeats`` times over (each repeat times every row once;
    ratios within a repeat); report medians with their min-max. orthogonal.json / orthogonal.md
    are rewritten after each row (an interrupted run keeps what it measured; ``"complete": false``
    until the last); return the table."""
    dev = resolve_device(device)
    methods = list(methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise KeyError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if min(sizes) < 2:
        raise ValueError(f"sizes must be >= 2, got {list(sizes)}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    runs: list[dict[str, Any]] = []
    facts = run_facts(device=str(dev), threads=torch.get_num_threads(), steps=steps, warmup=warmup,
                      repeats=repeats)

    def write(complete: bool) -> list[dict[str, Any]]:
        for r in range(repeats):
            ref = {row["C"]: row["seconds"] for row in runs if row["repeat"] == r
                   and row["method"] == "lipnext_manifold_adam" and "seconds" in row}
            for row in runs:
                if row["repeat"] == r and "seconds" in row and row["C"] in ref:
                    row["x_lipnext"] = row["seconds"] / ref[row["C"]]
        rows = summarize([{k: v for k, v in row.items() if k != "repeat"} for row in runs], ("method", "C"))
        write_results(out_dir, "orthogonal", {**facts, "runs": runs}, rows, orthogonal_table(rows, sizes),
                      complete)
        return rows

    for r in range(repeats):
        for c in sizes:
            for m in methods:
                try:
                    fn = orthogonal_step(m, c, dev).step
                except ImportError as e:
                    runs.append({"method": m, "C": c, "repeat": r, "skipped": f"not installed ({e.name})"})
                    log(f"{m} C={c}: skipped, {e.name} is not installed")
                    continue
                times = time_calls(fn, steps, warmup, dev)
                runs.append({"method": m, "C": c, "repeat": r, "seconds": median(times), "runs": len(times)})
                log(f"{m} C={c} (repeat {r + 1}/{repeats}): {1e3 * median(times):.2f} ms")
                write(complete=False)
    rows = write(complete=True)
    _plot(rows, sizes, Path(out_dir) / "orthogonal.png")
    return orthogonal_table(rows, sizes)


def orthogonal_table(rows: list[dict[str, Any]], sizes: Sequence[int]) -> str:
    """Markdown: ms per step and the ratio to LipNeXt's manifold step, one column per C; with
    repeats, medians with the min-max in brackets."""
    head = "| method | " + " | ".join(f"C={c}: ms; x LipNeXt" for c in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 1)]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for c in sizes:
            r = next((r for r in rows if r["method"] == m and r["C"] == c), None)
            if r is None:
                cells.append("not run")
            elif "skipped" in r:
                cells.append(r["skipped"])
            else:
                ratio = f"; {spread(r, 'x_lipnext', '{:.2f}x'.format)}" if "x_lipnext" in r else ""
                cells.append(spread(r, "seconds", lambda v: f"{1e3 * v:.2f}") + ratio)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], sizes: Sequence[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["C"], r["seconds"]) for r in rows if r["method"] == m and "seconds" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("C (matrix size)")
    ax.set_ylabel("seconds per step")
    ax.set_title("Orthogonal update, one step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
