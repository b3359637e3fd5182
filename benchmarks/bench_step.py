"""Training-step time of LipNeXt against an unconstrained twin with the same GEMM shapes.

    python benchmarks/bench_step.py [--model lipnext_l8w128] [--batch 128] [--image-size 32]
        [--repeats 10] [--threads N] [--json out.json]

The twin has the same stem, token GEMMs (two C x C per block), pooling and head, but
plain nn.Linear weights, ReLU instead of shift + beta-Abs, and torch.optim.Adam. Both
use cross-entropy so only the architecture and the optimizer differ. Also printed:
the optimizer's share of the LipNeXt step (ManifoldAdam with NAdam + Lookahead, as
build_optimizer) and fast_exp against torch.linalg.matrix_exp at C = 256 and 1024.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from bench_orthogonal_update import bench_fast_exp, median_ms

import lipnext
from lipnext.nn import L2Pool
from lipnext.optim import build_optimizer


class TwinBlock(nn.Module):
    """relu(((X + p) A^T) B^T + b): the GEMM shapes of a LipNeXt block, unconstrained."""

    def __init__(self, width: int, grid: tuple[int, int]):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(*grid, 1))
        self.a = nn.Linear(width, width, bias=False)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(self.a(x + self.pos)))


class Twin(nn.Module):
    def __init__(self, ref: lipnext.LipNeXt):
        super().__init__()
        p, grid = ref.patch_size, (ref.image_size[0] // ref.patch_size, ref.image_size[1] // ref.patch_size)
        self.p = p
        self.stem = nn.Linear(ref.in_chans * p * p, ref.width, bias=False)
        self.blocks = nn.ModuleList(TwinBlock(ref.width, grid) for _ in range(ref.depth))
        self.pool = L2Pool()
        self.head = nn.Linear(ref.width, ref.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // self.p, self.p, w // self.p, self.p).permute(0, 2, 4, 1, 3, 5)
        x = self.stem(x.reshape(b, h // self.p, w // self.p, -1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


def step_times(model: nn.Module, opt: torch.optim.Optimizer, x, y, repeats: int) -> dict:
    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def full_step() -> None:
        forward_backward()
        opt.step()

    total = median_ms(full_step, repeats, x.device)
    forward_backward()
    optim = median_ms(opt.step, repeats, x.device)
    return {"step_ms": total, "optimizer_ms": optim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lipnext_l8w128")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--exp-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = lipnext.create_model(args.model, image_size=args.image_size)
    model.validate_inputs = False
    twin = Twin(model)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    ours = step_times(model, build_optimizer(model, lr=1e-3), x, y, args.repeats)
    ref = step_times(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), x, y, args.repeats)
    exps = [bench_fast_exp(c, 0.5, args.repeats, cpu) for c in args.exp_sizes]
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
           "batch": args.batch, "image_size": args.image_size, "lipnext": ours, "twin": ref,
           "step_ratio": ours["step_ms"] / ref["step_ms"],
           "optimizer_share": ours["optimizer_ms"] / ours["step_ms"],
           "fast_exp": [{"C": e["C"], "fast_exp_ms": e["ours_ms"],
                         "matrix_exp_ms": e["reference_ms"]} for e in exps]}
    print(f"torch {res['torch']}, CPU, {res['threads']} threads; {args.model}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, fp32, median of {args.repeats}\n")
    print("| | step (ms) | optimizer (ms) | optimizer share |\n|---|---:|---:|---:|")
    for name, r in (("LipNeXt + ManifoldAdam", ours), ("twin (Linear, ReLU, Adam)", ref)):
        print(f"| {name} | {r['step_ms']:.1f} | {r['optimizer_ms']:.1f} | "
              f"{100 * r['optimizer_ms'] / r['step_ms']:.1f}% |")
    print(f"\nstep ratio LipNeXt / twin: {res['step_ratio']:.2f}x (target <= 1.3x); "
          f"optimizer share {100 * res['optimizer_share']:.1f}% (target < 15%)\n")
    print("| C | fast_exp (ms, ‖A‖_F=0.5) | matrix_exp (ms) | speed-up |\n|---:|---:|---:|---:|")
    for e in res["fast_exp"]:
        print(f"| {e['C']} | {e['fast_exp_ms']:.2f} | {e['matrix_exp_ms']:.2f} | "
              f"{e['matrix_exp_ms'] / e['fast_exp_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
