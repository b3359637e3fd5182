"""Speed of the orthogonal update: FastExp vs torch.linalg.matrix_exp, and one ManifoldAdam step.

    python benchmarks/bench_orthogonal_update.py [--sizes 256 1024] [--norms 0.1 0.5]
        [--step-sizes 128 256] [--stack 16] [--repeats 10] [--device cpu] [--threads N]
        [--plans 1024 4096 5792] [--json out.json]

Times are medians over --repeats calls after warm-up, in fp32. The step benchmark updates a
stack of --stack orthogonal C x C weights (NAdam + Lookahead K=5, as build_optimizer) and
compares it with the same matrices in one param group each (no batching). ``--plans``
prints (computed, not timed) FastExp's plan and the matrix products per orthogonal
matrix per step for NAdam-like steps at lr 1e-3 (``plan_table``). The script also runs
on the code before scaling and squaring (it then labels fast_exp by its old thresholds).
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from typing import Callable

import torch

from lipnext.nn import OrthogonalParameter, random_orthogonal
from lipnext.optim import ManifoldAdam, fast_exp

_FAST_EXP = importlib.import_module("lipnext.optim.fast_exp")   # the name fast_exp is the function


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device,
              warmup: int = 3) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def plan_label(a: torch.Tensor) -> str:
    """FastExp's plan for a, or the old threshold rule when the code predates plans."""
    if not hasattr(_FAST_EXP, "exp_plans"):
        norm = float(torch.linalg.matrix_norm(a))
        return next((f"Taylor order {k}" for bound, k in _FAST_EXP.TAYLOR_THRESHOLDS if norm < bound),
                    "matrix_exp")
    plan = _FAST_EXP.exp_plans(a)[0]
    if plan is None:
        return "matrix_exp"
    return f"order {plan[0]}, s = {plan[1]} ({_FAST_EXP.exp_cost(plan)} products)"


def bench_fast_exp(c: int, norm: float, repeats: int, device: torch.device) -> dict:
    a = torch.randn(c, c, device=device)
    a = a - a.T
    a = a * (norm / torch.linalg.matrix_norm(a))
    ours = median_ms(lambda: fast_exp(a), repeats, device)
    ref = median_ms(lambda: torch.linalg.matrix_exp(a), repeats, device)
    return dict(benchmark="fast_exp", C=c, norm=norm, setting=plan_label(a),
                ours_ms=ours, reference="torch.linalg.matrix_exp", reference_ms=ref)


def nadam_like_step(c: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A sign-like skew step (NAdam's m/sqrt(v) ~ +-1) of a rank-2 + noise gradient, ||.||_F = norm."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(c, 2, generator=g), torch.randn(c, 2, generator=g)
    grad = u @ v.T + 0.3 * torch.randn(c, c, generator=g)
    d = torch.sign(grad - grad.T)
    return d * (norm / torch.linalg.matrix_norm(d))


def plan_table(sizes: list[int]) -> list[dict]:
    """Plans and products per matrix per step for NAdam-like steps at lr 1e-3 (computed).

    A step costs X^T G, FastExp of U and X (E - I): 2 + cost(U). ||U||_F = 5.3e-4 C on the
    first step, 3e-4 C after; a Lookahead sync (every 5 steps) adds FastExp of 0.5 S, S the
    sum of 5 steps (at most 5 x 3e-4 C: taken aligned, the worst case), and one product.
    """
    rows = []
    for c in sizes:
        for regime, scale in (("first step", 5.3e-4), ("later steps", 3e-4),
                              ("Lookahead sync, 0.5 x 5 steps", 0.5 * 5 * 3e-4)):
            a = nadam_like_step(c, scale * c)
            plan = _FAST_EXP.exp_plans(a)[0]
            cost = _FAST_EXP.exp_cost(plan)
            per_step = cost + 1 if regime.startswith("Lookahead") else cost + 2
            rows.append(dict(C=c, regime=regime, norm=scale * c,
                             spectral=float(_FAST_EXP._norm_estimate((a @ a)[None])[0]),
                             plan=plan, exp_products=cost, step_products=per_step))
    return rows


def bench_step(c: int, stack: int, repeats: int, device: torch.device) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024],
                        help="C for fast_exp vs matrix_exp")
    parser.add_argument("--norms", type=float, nargs="+", default=[0.1, 0.5],
                        help="Frobenius norms of the skew input")
    parser.add_argument("--step-sizes", type=int, nargs="+", default=[128, 256],
                        help="C for the ManifoldAdam step")
    parser.add_argument("--stack", type=int, default=16, help="matrices per stack")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--plans", type=int, nargs="*", default=[], metavar="C",
                        help="print FastExp's plans for NAdam-like steps at these widths")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = [bench_fast_exp(c, norm, args.repeats, device)
            for c in args.sizes for norm in args.norms]
    rows += [bench_step(c, args.stack, args.repeats, device) for c in args.step_sizes]
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["ours_ms"]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, fp32, median of {args.repeats}\n")
    print("| benchmark | C | setting | lipnext (ms) | reference | reference (ms) | speed-up |")
    print("|---|---:|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['C']} | {r['setting']} | {r['ours_ms']:.2f} | "
              f"{r['reference']} | {r['reference_ms']:.2f} | {r['speedup']:.2f}x |")
    plans = plan_table(args.plans)
    if plans:
        print("\n| C | regime | ‖U‖_F | ‖U‖_2 (estimate) | plan (order, s) | FastExp products "
              "| products per matrix |")
        print("|---:|---|---:|---:|---|---:|---:|")
    for r in plans:
        print(f"| {r['C']} | {r['regime']} | {r['norm']:.2f} | {r['spectral']:.2f} | {r['plan']} | "
              f"{r['exp_products']} | {r['step_products']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=where, repeats=args.repeats, rows=rows,
                           plans=plans), f, indent=2)


if __name__ == "__main__":
    main()
