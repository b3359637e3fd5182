"""Speed of the orthogonal update: FastExp against ``torch.linalg.matrix_exp``, and one
ManifoldAdam step on stacked matrices against the same matrices one group each.

Times are medians over ``repeats`` calls after 3 warm-ups, fp32. The step benchmark updates
a stack of orthogonal C x C weights (NAdam + Lookahead k = 5, as ``build_optimizer``).
``plan_table`` gives (computed, not timed) FastExp's plan and the matrix products per
orthogonal matrix per step for NAdam-like steps at lr 1e-3.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from ..nn import OrthogonalParameter, random_orthogonal
from ..optim import ManifoldAdam, fast_exp
from ..ops.exp import _norm_estimate, exp_cost, exp_plans, exp_work
from .timing import median, resolve_device, time_calls

__all__ = ["bench_fast_exp", "bench_manifold_step", "plan_table", "run_exp"]

WARMUP = 3


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    return 1e3 * median(time_calls(fn, repeats, WARMUP, device))


def plan_label(a: torch.Tensor) -> str:
    """FastExp's plan for a: Taylor order and squarings, or the exact fallback."""
    plan = exp_plans(a)[0]
    if plan is None:
        return "matrix_exp"
    return f"order {plan[0]}, s = {plan[1]} ({exp_cost(plan)} products)"


def bench_fast_exp(c: int, norm: float, repeats: int, device: torch.device) -> dict[str, Any]:
    """FastExp and matrix_exp on one random skew C x C matrix with ||A||_F = norm."""
    a = torch.randn(c, c, device=device)
    a = a - a.T
    a = a * (norm / torch.linalg.matrix_norm(a))
    ours = median_ms(lambda: fast_exp(a), repeats, device)
    ref = median_ms(lambda: torch.linalg.matrix_exp(a), repeats, device)
    return dict(benchmark="fast_exp", C=c, norm=norm, setting=plan_label(a),
                ours_ms=ours, reference="torch.linalg.matrix_exp", reference_ms=ref)


def nadam_like_step(c: int, norm: float, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """A sign-like skew step (NAdam's m/sqrt(v) ~ +-1) of a rank-2 + noise gradient, ||.||_F = norm,
    drawn on ``device``."""
    g = torch.Generator(device).manual_seed(seed)
    u, v = torch.randn(c, 2, generator=g, device=device), torch.randn(c, 2, generator=g, device=device)
    grad = u @ v.T + 0.3 * torch.randn(c, c, generator=g, device=device)
    d = torch.sign(grad - grad.T)
    return d * (norm / torch.linalg.matrix_norm(d))


def plan_table(sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Plans and products per matrix per step for NAdam-like steps at lr 1e-3 (computed).

    A step costs FastExp of U and X (E - I): cost(U) + 1, plus X^T G where the gradient is
    Euclidean (where the layer delivers X^T G, ``lipnext.nn.lie``, it costs nothing).
    ||U||_F = 5.3e-4 C on the first step, 3e-4 C after. A Lookahead sync step (every 5
    steps) computes FastExp of 0.5 S, S the sum of 5 steps (at most 5 x 3e-4 C: taken
    aligned, the worst case), and one product, instead of the step's own X exp(U).
    ``step_work``: the same in units of C^3 multiply-adds, with B^2 and B^3 at 9/16 of a
    product from C = 512 on (``ops.exp.structured_product``).
    """
    rows = []
    for c in sizes:
        for regime, scale in (("first step", 5.3e-4), ("later steps", 3e-4),
                              ("Lookahead sync step, 0.5 x 5 steps", 0.5 * 5 * 3e-4)):
            a = nadam_like_step(c, scale * c)
            plan = exp_plans(a)[0]
            cost = exp_cost(plan)
            rows.append(dict(C=c, regime=regime, norm=scale * c,
                             spectral=float(_norm_estimate((a @ a)[None])[0]),
                             plan=plan, exp_products=cost, step_products=cost + 1,
                             euclidean_step_products=cost + 2, step_work=exp_work(plan, c) + 1))
    return rows


def bench_manifold_step(c: int, stack: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """One ManifoldAdam step on ``stack`` C x C matrices, batched against one group each."""
    def make(grouped: bool) -> ManifoldAdam:
        params = [OrthogonalParameter(random_orthogonal(c).to(device)) for _ in range(stack)]
        for p in params:
            p.grad = torch.randn(c, c, device=device)
        groups = [{"params": [p]} for p in params] if grouped else params
        return ManifoldAdam(groups, lr=1e-3, nesterov=True, lookahead_k=5)

    batched, per_matrix = make(False), make(True)
    ours = median_ms(batched.step, repeats, device)
    ref = median_ms(per_matrix.step, repeats, device)
    return dict(benchmark="ManifoldAdam.step", C=c, setting=f"{stack} matrices stacked",
                ours_ms=ours, reference=f"{stack} groups of 1 (unbatched)", reference_ms=ref)


def run_exp(sizes: Sequence[int], norms: Sequence[float], step_sizes: Sequence[int], stack: int = 16,
            repeats: int = 10, device: str = "cpu", plans: Sequence[int] = (),
            json_path: str | Path | None = None) -> str:
    """Run the timings and the plan table; return the Markdown tables (and write JSON)."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    rows = [bench_fast_exp(c, norm, repeats, dev) for c in sizes for norm in norms]
    rows += [bench_manifold_step(c, stack, repeats, dev) for c in step_sizes]
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["ours_ms"]
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    lines = [f"torch {torch.__version__}, {where}, fp32, median of {repeats}\n",
             "| benchmark | C | setting | lipnext (ms) | reference | reference (ms) | speed-up |",
             "|---|---:|---|---:|---|---:|---:|"]
    lines += [f"| {r['benchmark']} | {r['C']} | {r['setting']} | {r['ours_ms']:.2f} | "
              f"{r['reference']} | {r['reference_ms']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    plan_rows = plan_table(plans)
    if plan_rows:
        lines += ["", "| C | regime | ‖U‖_F | ‖U‖_2 (estimate) | plan (order, s) | FastExp products "
                  "| products per matrix, Lie-form gradient | with X^T G | C^3 multiply-adds per matrix, Lie form |",
                  "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['C']} | {r['regime']} | {r['norm']:.2f} | {r['spectral']:.2f} | {r['plan']} | "
              f"{r['exp_products']} | {r['step_products']} | {r['euclidean_step_products']} | "
              f"{r['step_work']:g} |" for r in plan_rows]
    if json_path:
        payload = json.dumps(dict(torch=torch.__version__, device=where, repeats=repeats, rows=rows,
                                  plans=plan_rows), indent=2)
        atomic_write(json_path, lambda p: Path(p).write_text(payload))
    return "\n".join(lines) + "\n"
