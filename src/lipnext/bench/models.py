"""Model benchmark: training-step time, the optimizer's share of it, inference throughput,
peak memory, FLOPs, achieved FLOP/s and MFU of named models, fp32 and bf16, as ratios
against the first LipNeXt model of the same run.

Each (model, dtype) is measured in a fresh process (spawn) so that CPU peak memory is
that of this model alone (see ``timing``). A training step is the real one: forward,
EMMA loss, backward, ``build_optimizer``'s ManifoldAdam step (manifold rule for LipNeXt's
orthogonal weights, NAdam for everything else). bf16 means autocast to bfloat16 with
fp32 weights (on a CPU too, where it is usually slower).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one training step
(forward + backward + optimizer) and on one inference forward: it counts matrix
products and convolutions (2 FLOPs per multiply-add); FFTs, factorisations (Cholesky,
solve, SVD) and elementwise work are not counted, so for BRONet-style and
LiResNet-style models the count is a lower bound on the work done.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engine.distributed import DistInfo, build_model
from ..io import atomic_write
from ..losses import emma_loss
from ..models.base import CertifiableModel
from ..models.lipnext import LipNeXtBlock, compile_mode, compiles, set_compile
from ..optim import build_optimizer
from .results import run_facts, spread, summarize, write_results
from .timing import (median, peak_rss_bytes, peak_tflops, resolve_device, rss_bytes, synchronize,
                     time_calls)

__all__ = ["bench_model", "measure_model", "run_model_bench", "bench_table"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _count_flops(fn: Callable[[], object], model: torch.nn.Module) -> int:
    """FLOPs of one call of fn, with ``model``'s blocks eager (the counter does not see inside
    compiled code)."""
    modes = {b: b.compile_mode for b in model.modules() if isinstance(b, LipNeXtBlock)}
    set_compile(model, False)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    finally:
        for block, mode in modes.items():
            block.compile_mode = mode
    return int(counter.get_total_flops())


def bench_model(name: str, device: torch.device, seed: int = 0, **kwargs: Any) -> CertifiableModel:
    """The named model on ``device`` as the trainer builds it (``engine.distributed.build_model``):
    orthogonal matrices allocated on the meta device and drawn on ``device``, so a 1B or 2B
    model on a GPU runs no float64 QR of 4096^2 or 5792^2 on the host."""
    torch.manual_seed(seed)
    return build_model(name, DistInfo(), device, seed, **kwargs)


def _setup(name: str, batch: int, image_size: int, num_classes: int, dev: torch.device, amp,
           compiled: bool | str = "auto"):
    """Model, optimizer, a random batch, and a closure running forward + EMMA + backward."""
    model = set_compile(bench_model(name, dev, num_classes=num_classes, image_size=image_size), compiled)
    model.validate_inputs = False
    opt = build_optimizer(model)
    x = torch.rand(batch, model.in_chans, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    lip = model.lipschitz_bound()

    def backward():
        with amp:
            logits = model(x)
        loss = emma_loss(logits, y, model.head_weight(), lip, 36 / 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    return backward, model, opt, x


def measure_model(name: str, batch: int = 128, image_size: int = 32, num_classes: int = 10,
                  dtype: str = "fp32", steps: int = 5, warmup: int = 2, device: str = "auto",
                  peak: float | None = None, threads: int | None = None,
                  compiled: bool | str = "auto", rss_baseline: bool = True) -> dict[str, Any]:
    """Measure one model at one dtype in this process (see the module docstring); ``compiled``:
    whether its LipNeXt blocks run torch.compiled (``set_compile``: auto = on CUDA; FLOPs are
    counted on the eager blocks, the same arithmetic, which the counter sees). ``rss_baseline``
    (CPU): first take a step of a batch-of-2 copy, so that peak memory counts this model alone."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32 or bf16")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    amp = (torch.autocast(dev.type, dtype=DTYPES[dtype]) if DTYPES[dtype] is not None
           else nullcontext())
    if dev.type == "cpu" and rss_baseline:
        # A first step on a batch of 2 pages in the code and one-off buffers of every
        # kernel used, so that the RSS baseline below does not count them.
        first_backward, _, first_opt, _ = _setup(name, 2, image_size, num_classes, dev, amp, compiled)
        first_backward()
        first_opt.step()
        del first_backward, first_opt
        gc.collect()
    rss0 = rss_bytes()
    backward, model, opt, x = _setup(name, batch, image_size, num_classes, dev, amp, compiled)
    opt_times: list[float] = []

    def train_step():
        backward()
        synchronize(dev)
        t0 = time.perf_counter()
        opt.step()
        synchronize(dev)
        opt_times.append(time.perf_counter() - t0)

    @torch.no_grad()
    def infer():
        with amp:
            model(x)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    step_times = time_calls(train_step, steps, warmup, dev)
    opt_s = median(opt_times[warmup:])
    peak_mem = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                else peak_rss_bytes() - rss0)
    train_flops = _count_flops(train_step, model)
    model.eval()
    infer_times = time_calls(infer, steps, warmup, dev)
    infer_flops = _count_flops(infer, model)
    step_s = median(step_times)
    achieved = train_flops / step_s
    peak_tf = peak_tflops(dev, peak)
    return {
        "model": name, "arch": model.arch, "params": sum(p.numel() for p in model.parameters()),
        "dtype": dtype, "batch": batch, "image_size": image_size, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "step_s": step_s, "optimizer_s": opt_s, "optimizer_share": opt_s / step_s,
        "infer_s": median(infer_times), "throughput": batch / median(infer_times),
        "peak_mem_bytes": int(peak_mem),
        "peak_mem_kind": ("cuda.max_memory_allocated" if dev.type == "cuda"
                          else "peak RSS - RSS before the model"),
        "train_flops": train_flops, "infer_flops": infer_flops, "achieved_flops": achieved,
        "peak_tflops": peak_tf, "mfu": achieved / (peak_tf * 1e12) if peak_tf else None,
        "step_runs": len(step_times), "lipschitz": model.lipschitz_bound(),
        "compiled": compiles(compile_mode(compiled), dev),
    }


def _child(kwargs: dict[str, Any]) -> dict[str, Any]:
    return measure_model(**kwargs)


def run_model_bench(models: Sequence[str], out_dir: str | Path, batch: int = 128,
                    image_size: int = 32, num_classes: int = 10, dtypes: Sequence[str] = ("fp32",),
                    steps: int = 5, warmup: int = 2, device: str = "auto",
                    peak_tflops: float | None = None, threads: int | None = None,
                    isolate: bool = True, repeats: int = 3,
                    log: Callable[[str], None] = lambda s: print(s, flush=True)) -> str:
    """Measure every model at every dtype, ``repeats`` times over (each repeat measures every
    row once, so the rows of a repeat share the machine's load and its ratios compare them);
    report each figure as the median with its min-max over the repeats. bench.json (the
    summary in ``results``, every measurement in ``runs``) and bench.md are rewritten after each
    measurement (an interrupted run keeps what it measured; ``"complete": false`` until the
    last), then bench.png."""
    from ..models import model_entry
    for m in models:
        model_entry(m)                     # unknown names fail before any measurement
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; use fp32 or bf16")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    ctx = mp.get_context("spawn")
    runs: list[dict[str, Any]] = []
    out = Path(out_dir)
    facts = run_facts(steps=steps, warmup=warmup, repeats=repeats)

    def write(complete: bool) -> str:
        rows = _summary(runs, repeats)
        return write_results(out, "bench", {**facts, "runs": runs}, rows,
                             _heading(rows, repeats) + bench_table(rows), complete)

    for r in range(repeats):
        for d in dtypes:
            for m in models:
                kwargs = dict(name=m, batch=batch, image_size=image_size, num_classes=num_classes,
                              dtype=d, steps=steps, warmup=warmup, device=device, peak=peak_tflops,
                              threads=threads)
                if isolate:
                    with ctx.Pool(1) as pool:
                        row = pool.apply(_child, (kwargs,))
                else:
                    row = measure_model(**kwargs)
                runs.append({**row, "repeat": r})
                log(f"{m} {d} (repeat {r + 1}/{repeats}): step {1e3 * row['step_s']:.1f} ms, "
                    f"{row['throughput']:.0f} img/s, peak {row['peak_mem_bytes'] / 2**20:.0f} MiB")
                write(complete=False)
    md = write(complete=True)
    _plot(_summary(runs, repeats), out / "bench.png")
    return md


def _summary(runs: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Ratios within each repeat, then one row per (model, dtype): medians and ranges."""
    for r in range(repeats):
        add_ratios([row for row in runs if row["repeat"] == r])
    return summarize([{k: v for k, v in row.items() if k != "repeat"} for row in runs], ("model", "dtype"))


def _heading(rows: list[dict[str, Any]], repeats: int) -> str:
    done = min((r["repeats"] for r in rows), default=0)
    return (f"Median of {done} of {repeats} repeats (min-max where they differ), each a fresh "
            "process per row; ratios within each repeat.\n\n")


def add_ratios(results: list[dict[str, Any]]) -> None:
    """x_lipnext ratios against the first LipNeXt model of the same dtype (in place)."""
    for d in dict.fromkeys(r["dtype"] for r in results):
        rows = [r for r in results if r["dtype"] == d]
        ref = next((r for r in rows if r["arch"] == "lipnext"), None)
        if ref is None:
            continue
        for r in rows:
            r["reference"] = ref["model"]
            r["step_x"] = r["step_s"] / ref["step_s"]
            r["throughput_x"] = r["throughput"] / ref["throughput"]
            r["mem_x"] = r["peak_mem_bytes"] / max(ref["peak_mem_bytes"], 1)


def bench_table(results: list[dict[str, Any]]) -> str:
    """Markdown table, one row per (model, dtype); with repeats, each figure is its median with
    the min-max over the repeats in brackets (``results.summarize``)."""
    head = ("| model | params | dtype | train step ms | x LipNeXt | optimizer share | infer img/s "
            "| x LipNeXt | peak MiB | x LipNeXt | GFLOP/step | achieved GFLOP/s | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    cells = (("step_s", lambda v: f"{1e3 * v:.1f}"), ("step_x", "{:.2f}".format),
             ("optimizer_share", lambda v: f"{100 * v:.1f}%"), ("throughput", "{:.0f}".format),
             ("throughput_x", "{:.2f}".format), ("peak_mem_bytes", lambda v: f"{v / 2**20:.0f}"),
             ("mem_x", "{:.2f}".format), ("train_flops", lambda v: f"{v / 1e9:.2f}"),
             ("achieved_flops", lambda v: f"{v / 1e9:.1f}"), ("mfu", lambda v: f"{100 * v:.1f}%"))
    for r in results:
        figures = [spread(r, k, fmt) if r.get(k) is not None else
                   ("n/a (no known peak)" if k == "mfu" else "-") for k, fmt in cells]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['dtype']} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    metrics = [("step_s", 1e3, "train step (ms)"), ("throughput", 1, "inference (img/s)"),
               ("peak_mem_bytes", 2 ** -20, "peak memory (MiB)")]
    for ax, (key, scale, label) in zip(axes, metrics):
        for j, d in enumerate(dtypes):
            rows = [r for r in results if r["dtype"] == d]
            pos = [i + j * 0.8 / len(dtypes) for i in range(len(rows))]
            ax.bar(pos, [r[key] * scale for r in rows], width=0.8 / len(dtypes), label=d)
            ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right",
                          fontsize=7)
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
