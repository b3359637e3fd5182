"""Training-step time of LipNeXt, as the trainer runs it, against an unconstrained twin.

LipNeXt step = the trainer's ``engine.TrainStep``: the Lipschitz bound when due
(``loss.lipschitz_every``), forward, EMMA loss, backward, gradient clipping at 3, the finite
check, ``build_optimizer``'s ManifoldAdam step (NAdam + Lookahead, the trainer's
``optim.chunk_size``). The two models' steps alternate (A B A B ...), so both see the same
machine load; the optimizer and the bound are timed inside the LipNeXt step. The twin
has the same stem, token GEMMs (two C x C per block), pooling and head, but nn.Linear
weights, ReLU instead of shift + beta-Abs, cross-entropy, the same clipping and
torch.optim.Adam. ``depth`` keeps the model's width with fewer blocks (both models). Steps
at cadence N > 1 are computed as (step with the bound) - (1 - 1/N) (bound), both measured;
the ratio is the median over rounds of each round's ratio (both steps under one load).
Also: FastExp against torch.linalg.matrix_exp on skew matrices of the given Frobenius
norms. Medians of ``repeats`` after one warm-up; the ratio's spread is over the rounds.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OptimConfig
from ..engine.distributed import DistInfo, lipschitz_bound
from ..engine.step import TrainStep
from ..io import atomic_write
from ..losses import emma_loss
from ..models import create_model
from ..models.lipnext import LipNeXt, set_compile
from ..nn.pool import L2Pool
from ..ops.patchify import patchify
from ..optim import build_optimizer
from .exp import bench_fast_exp
from .timing import interleaved_calls, median

__all__ = ["Twin", "measure_step", "run_step"]

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
    """LipNeXt's shapes (stem, blocks, L2 pooling, head) with unconstrained weights."""

    def __init__(self, ref: LipNeXt):
        super().__init__()
        p = ref.patch_size
        grid = (ref.image_size[0] // p, ref.image_size[1] // p)
        self.p = p
        self.stem = nn.Linear(ref.in_chans * p * p, ref.cfg.width, bias=False)
        self.blocks = nn.ModuleList(TwinBlock(ref.cfg.width, grid) for _ in range(ref.cfg.depth))
        self.pool = L2Pool()
        self.head = nn.Linear(ref.cfg.width, ref.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(patchify(x, self.p))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


class _Timed:
    """The optimizer, its ``step()`` timed into ``seconds``; everything else passed through."""

    def __init__(self, optimizer: torch.optim.Optimizer, seconds: list[float]):
        self._optimizer, self._seconds = optimizer, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def step(self) -> None:
        t0 = time.perf_counter()
        self._optimizer.step()
        self._seconds.append(time.perf_counter() - t0)


def lipnext_step(model: LipNeXt, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 parts: dict[str, list[float]]) -> Callable[[], None]:
    """The trainer's ``TrainStep`` with the bound measured every call; appends the parts' seconds."""
    info, cpu = DistInfo(), torch.device("cpu")
    train_step = TrainStep(model, model, _Timed(opt, parts["optimizer"]), emma_loss, info, cpu,
                           grad_clip=CLIP)

    def step() -> None:
        t0 = time.perf_counter()
        lip = lipschitz_bound(model, info, cpu)
        parts["bound"].append(time.perf_counter() - t0)
        train_step(0, x, y, 1e-3, 36 / 255, lip)
    return step


def twin_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return step


def measure_step(model_name: str, depth: int | None, batch: int, image_size: int,
                 cadences: Sequence[int], repeats: int, compiled: bool = False) -> dict[str, Any]:
    """LipNeXt's and the twin's step times at one batch size (see the module docstring);
    ``compiled``: LipNeXt's blocks torch.compiled (``set_compile``), the twin eager."""
    torch.manual_seed(0)
    kwargs = {"depth": depth} if depth else {}
    model = set_compile(create_model(model_name, image_size=image_size, **kwargs), compiled)
    model.validate_inputs = False
    twin = Twin(model)
    x = torch.rand(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    parts: dict[str, list[float]] = {"bound": [], "optimizer": []}
    times = interleaved_calls(
        {"lipnext": lipnext_step(model, build_optimizer(model, lr=1e-3, chunk_size=OptimConfig.chunk_size),
                                 x, y, parts),
         "twin": twin_step(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), x, y)}, repeats)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    bounds = parts["bound"][1:]                       # (the first call was the warm-up)
    bound, optim = (1e3 * median(parts[k][1:]) for k in ("bound", "optimizer"))
    steps = {n: ms["lipnext"] - (1 - 1 / n) * bound for n in cadences}
    rounds = {n: [(a - (1 - 1 / n) * b) / t for a, b, t in zip(times["lipnext"], bounds, times["twin"])]
              for n in cadences}                     # per round: both steps under the same load
    return {"model": model_name, "depth": model.cfg.depth, "width": model.cfg.width, "batch": batch,
            "tokens_per_call": batch * (image_size // model.patch_size) ** 2,
            "lipnext_step_ms": steps, "bound_ms": bound, "optimizer_ms": optim,
            "twin_step_ms": ms["twin"], "ratio": {n: median(r) for n, r in rounds.items()},
            "ratio_range": {n: (min(r), max(r)) for n, r in rounds.items()},
            "times_s": times}


def step_table(rows: list[dict[str, Any]], exps: list[dict[str, Any]], repeats: int,
               compiled: bool) -> str:
    """The Markdown report: one row per (batch, cadence), then FastExp against matrix_exp."""
    mode = "LipNeXt blocks compiled" if compiled else "eager"
    lines = [f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, fp32, {mode}, "
             f"median of {repeats}\n",
             "| model | batch | tokens/call | bound every | LipNeXt step (ms) | twin step (ms) "
             "| ratio: median of rounds (range) | optimizer (ms) | bound (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for n, t in r["lipnext_step_ms"].items():
            lo, hi = r["ratio_range"][n]
            lines.append(f"| {r['model']} ({r['depth']} blocks) | {r['batch']} | {r['tokens_per_call']} "
                         f"| {n} | {t:.0f} | {r['twin_step_ms']:.0f} | {r['ratio'][n]:.2f}x ({lo:.2f}-{hi:.2f}) "
                         f"| {r['optimizer_ms']:.0f} | {r['bound_ms']:.0f} |")
    if exps:
        lines += ["", "| C | ‖A‖_F | fast_exp (ms) | plan | matrix_exp (ms) | speed-up |",
                  "|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {e['C']} | {e['norm']} | {e['ours_ms']:.1f} | {e['setting']} | "
              f"{e['reference_ms']:.1f} | {e['reference_ms'] / e['ours_ms']:.2f}x |" for e in exps]
    return "\n".join(lines) + "\n"


def run_step(model: str = "lipnext_l8w128", depth: int | None = None, batches: Sequence[int] = (128,),
             cadences: Sequence[int] = (1,), image_size: int = 32, repeats: int = 5,
             exp_sizes: Sequence[int] = (1024,), exp_norms: Sequence[float] = (2.0, 4.0),
             compiled: bool = False, json_path: str | Path | None = None) -> str:
    """Measure every batch size, then FastExp; return the report (and write JSON)."""
    rows = [measure_step(model, depth, b, image_size, cadences, repeats, compiled) for b in batches]
    exps = [bench_fast_exp(c, norm, repeats, torch.device("cpu")) for c in exp_sizes for norm in exp_norms]
    if json_path:
        payload = json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "steps": rows, "fast_exp": exps}, indent=2)
        atomic_write(json_path, lambda p: Path(p).write_text(payload))
    return step_table(rows, exps, repeats, compiled)
