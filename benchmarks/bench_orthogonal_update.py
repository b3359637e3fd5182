"""Speed of the orthogonal update: FastExp vs torch.linalg.matrix_exp, and one ManifoldAdam step.

    python benchmarks/bench_orthogonal_update.py [--sizes 256 1024] [--norms 0.1 0.5]
        [--step-sizes 128 256] [--stack 16] [--repeats 10] [--device cpu] [--threads N]
        [--json out.json]

Times are medians over --repeats calls after warm-up, in fp32. The step benchmark updates a
stack of --stack orthogonal C x C weights (NAdam + Lookahead K=5, as build_optimizer) and
compares it with the same matrices in one param group each (no batching).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from lipnext.nn import OrthogonalParameter, random_orthogonal
from lipnext.optim import TAYLOR_THRESHOLDS, ManifoldAdam, fast_exp


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


def taylor_order(norm: float) -> str:
    return next((f"order {k}" for bound, k in TAYLOR_THRESHOLDS if norm < bound), "exact")


def bench_fast_exp(c: int, norm: float, repeats: int, device: torch.device) -> dict:
    a = torch.randn(c, c, device=device)
    a = a - a.T
    a = a * (norm / torch.linalg.matrix_norm(a))
    ours = median_ms(lambda: fast_exp(a), repeats, device)
    ref = median_ms(lambda: torch.linalg.matrix_exp(a), repeats, device)
    return dict(benchmark="fast_exp", C=c, setting=f"‖A‖_F={norm} ({taylor_order(norm)})",
                ours_ms=ours, reference="torch.linalg.matrix_exp", reference_ms=ref)


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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=where, repeats=args.repeats, rows=rows),
                      f, indent=2)


if __name__ == "__main__":
    main()
