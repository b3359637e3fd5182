"""Training-step time of LipNeXt, as the trainer runs it, against an unconstrained twin.

    python benchmarks/bench_step.py [--model lipnext_l8w128] [--depth D] [--batch 128 [8 ...]]
        [--lipschitz-every 1 10] [--image-size 32] [--repeats 5] [--threads N]
        [--exp-sizes 1024] [--exp-norms 2 4] [--json out.json]

LipNeXt step = the trainer's: the Lipschitz bound when due (``loss.lipschitz_every``),
forward, EMMA loss, backward, gradient clipping at 3, ``build_optimizer``'s ManifoldAdam
step (NAdam + Lookahead). The two models' steps alternate (A B A B ...), so both see
the same machine load; the optimizer and the bound are timed inside the LipNeXt step. The twin has the same stem, token GEMMs (two C x C per block),
pooling and head, but nn.Linear weights, ReLU instead of shift + beta-Abs, cross-entropy,
the same clipping and torch.optim.Adam. ``--depth`` keeps the model's width with fewer
blocks (both models). Steps at cadence N > 1 are computed as (step with the bound) -
(1 - 1/N) (bound), both measured. Also: fast_exp against torch.linalg.matrix_exp on
skew matrices of the given Frobenius norms. Medians of ``--repeats`` after one warm-up;
the ratio's spread is over the rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench_orthogonal_update import bench_fast_exp

import lipnext
from lipnext.losses import emma_loss
from lipnext.models.lipnext import LipNeXtBlock
from lipnext.nn import L2Pool
from lipnext.optim import build_optimizer

CLIP = 3.0


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
        self.stem = nn.Linear(ref.in_chans * p * p, ref.cfg.width, bias=False)
        self.blocks = nn.ModuleList(TwinBlock(ref.cfg.width, grid) for _ in range(ref.cfg.depth))
        self.pool = L2Pool()
        self.head = nn.Linear(ref.cfg.width, ref.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // self.p, self.p, w // self.p, self.p).permute(0, 2, 4, 1, 3, 5)
        x = self.stem(x.reshape(b, h // self.p, w // self.p, -1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


def lipnext_step(model: lipnext.LipNeXt, opt: torch.optim.Optimizer, x, y, parts: dict):
    """The trainer's step with the bound measured every call; appends the parts' seconds."""
    def step() -> None:
        t0 = time.perf_counter()
        lip = float(model.lipschitz_bound())
        t1 = time.perf_counter()
        loss = emma_loss(model(x).float(), y, model.head_weight(), lip, 36 / 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        t2 = time.perf_counter()
        if bool(torch.isfinite(torch.stack([loss.detach(), gnorm])).all()):
            opt.step()
        parts["bound"].append(t1 - t0)
        parts["optimizer"].append(time.perf_counter() - t2)
    return step


def twin_step(model: nn.Module, opt: torch.optim.Optimizer, x, y):
    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return step


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn, called in turn (A B A B ...) so that all see the same load."""
    for fn in fns.values():
        fn()                                            # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def measure(model_name: str, depth: int | None, batch: int, image_size: int, cadences: list[int],
            repeats: int) -> dict:
    torch.manual_seed(0)
    kwargs = {"depth": depth} if depth else {}
    model = lipnext.create_model(model_name, image_size=image_size, **kwargs)
    model.validate_inputs = False
    twin = Twin(model)
    x = torch.rand(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    parts: dict[str, list[float]] = {"bound": [], "optimizer": []}
    times = interleaved({"lipnext": lipnext_step(model, build_optimizer(model, lr=1e-3), x, y, parts),
                         "twin": twin_step(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), x, y)},
                        repeats)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    bound, optim = (1e3 * statistics.median(parts[k][1:]) for k in ("bound", "optimizer"))
    steps = {n: ms["lipnext"] - (1 - 1 / n) * bound for n in cadences}
    ratios = [a / b for a, b in zip(times["lipnext"], times["twin"])]
    return {"model": model_name, "depth": model.cfg.depth, "width": model.cfg.width, "batch": batch,
            "tokens_per_call": batch * (image_size // model.patch_size) ** 2,
            "lipnext_step_ms": steps, "bound_ms": bound, "optimizer_ms": optim,
            "twin_step_ms": ms["twin"], "ratio": {n: t / ms["twin"] for n, t in steps.items()},
            "ratio_range_every_1": (min(ratios), max(ratios)),
            "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lipnext_l8w128")
    ap.add_argument("--depth", type=int, help="number of blocks (default: the model's)")
    ap.add_argument("--batch", type=int, nargs="+", default=[128])
    ap.add_argument("--lipschitz-every", type=int, nargs="+", default=[1], metavar="N")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exp-sizes", type=int, nargs="*", default=[1024])
    ap.add_argument("--exp-norms", type=float, nargs="*", default=[2.0, 4.0])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the LipNeXt blocks (LipNeXtBlock.compiled = True; twin eager)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        LipNeXtBlock.compiled = True
    rows = [measure(args.model, args.depth, b, args.image_size, args.lipschitz_every, args.repeats)
            for b in args.batch]
    exps = [bench_fast_exp(c, norm, args.repeats, torch.device("cpu"))
            for c in args.exp_sizes for norm in args.exp_norms]
    mode = "LipNeXt blocks compiled" if args.compile else "eager"
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, fp32, {mode}, "
          f"median of {args.repeats}; {lipnext.__file__}\n")
    print("| model | batch | tokens/call | bound every | LipNeXt step (ms) | twin step (ms) | ratio "
          "| optimizer (ms) | bound (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for n, t in r["lipnext_step_ms"].items():
            spread = "(per-round {:.2f}-{:.2f})".format(*r["ratio_range_every_1"]) if n == 1 else ""
            print(f"| {r['model']} ({r['depth']} blocks) | {r['batch']} | {r['tokens_per_call']} | {n} "
                  f"| {t:.0f} | {r['twin_step_ms']:.0f} | {r['ratio'][n]:.2f}x {spread} "
                  f"| {r['optimizer_ms']:.0f} | {r['bound_ms']:.0f} |")
    if exps:
        print("\n| C | ‖A‖_F | fast_exp (ms) | plan | matrix_exp (ms) | speed-up |\n"
              "|---:|---:|---:|---|---:|---:|")
    for e in exps:
        print(f"| {e['C']} | {e['norm']} | {e['ours_ms']:.1f} | {e['setting']} | "
              f"{e['reference_ms']:.1f} | {e['reference_ms'] / e['ours_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "steps": rows, "fast_exp": exps}, f, indent=2)


if __name__ == "__main__":
    main()
