"""The measurement stages of the GPU check (``bench.gpu``), each against a computed figure:

* ``l32w1024``: LipNeXt L32W1024 on CIFAR-sized inputs at 256 images per GPU, bf16 + compiled
  blocks, bf16 eager and fp32 + compiled: training images/s, MFU and peak bytes per parameter,
  against the rate the paper's 1B run implies at its MFU (computed).
* ``optimizer``: seconds of one ManifoldAdam step per matrix, fp32, TF32 and bf16 products, at
  C = 1024, 4096 and 5792, against the counted FLOPs at the datasheet's peak (computed).
* ``1b``: L32W4096 at the per-GPU batch of the paper's 8-GPU run (1024 / 8 = 128 images of
  224 x 224): one block's forward, backward and update, and a whole training step.
* ``2b``: lipnext_2b on ONE GPU with activation checkpointing: the largest batch that fits
  (doubling, then halving the gap; a CUDA out-of-memory error ends a try), its step time and
  its peak memory.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engine.trainer import _enable_activation_checkpointing
from ..losses import emma_loss
from ..models.lipnext import set_compile
from ..nn import OrthogonalParameter, mark_lie_gradient, random_orthogonal
from ..optim import ManifoldAdam, build_optimizer
from .gpu_context import StageContext
from .models import bench_model, measure_model
from .timing import median, peak_tflops, time_calls

__all__ = ["stage_1b", "stage_2b", "stage_l32w1024", "stage_optimizer"]

#: the paper's 1B run: ImageNet-1k (1,281,167 images) in 8.9 min per epoch on 8 H100s
PAPER_1B_IMAGES_PER_GPU_S = 1_281_167 / (8.9 * 60) / 8
PAPER_2B_IMAGES_PER_GPU_S = 1_281_167 / (17.8 * 60) / 16


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def stage_l32w1024(ctx: StageContext) -> None:
    name, batch = ctx.size(("lipnext_l32w1024", 256), ("lipnext_l4w64", 8))
    peak = peak_tflops(ctx.device)
    for label, dtype, compiled in (("bf16 + compile", "bf16", True), ("bf16 eager", "bf16", False),
                                   ("fp32 + compile", "fp32", True)):
        r = measure_model(name, batch=batch, image_size=32, dtype=dtype, steps=ctx.size(5, 1),
                          warmup=ctx.size(3, 1), device=str(ctx.device), compiled=compiled,
                          rss_baseline=False)
        row = {"images_per_s": batch / r["step_s"], "step_s": r["step_s"], "optimizer_s": r["optimizer_s"],
               "train_TFLOP_per_step": r["train_flops"] / 1e12, "mfu_bf16_peak": r["mfu"],
               "peak_bytes_per_param": r["peak_mem_bytes"] / r["params"], "params": r["params"]}
        if peak:          # the paper's 1B MFU (its implied rate at 989 TFLOP/s), on this model
            paper_mfu = PAPER_1B_IMAGES_PER_GPU_S * _flops_per_image_1b() / (989e12)
            row["paper_mfu_1b (computed)"] = paper_mfu
            row["images_per_s_at_paper_mfu (computed)"] = paper_mfu * peak * 1e12 / (r["train_flops"] / batch)
        ctx.record(**{label: row})


def _flops_per_image_1b() -> float:
    """Training FLOPs per 224 x 224 image of L32W4096 (computed): 3 x (2 x 196 tokens x the
    trunk's 2 C^2 per block x 32) for the token GEMMs, forward and backward, by hand."""
    c, tokens, depth = 4096, 196, 32
    return 3 * 2 * tokens * 2 * c * c * depth


def _counted(fn: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def stage_optimizer(ctx: StageContext) -> None:
    for c in ctx.size((1024, 4096, 5792), (16, 32, 48)):
        for prec in ("fp32", "tf32", "bf16"):
            figures = _optimizer_step(ctx.device, c, ctx.size(8 if c <= 4096 else 3, 2), prec, ctx.size(5, 2))
            ctx.record(**{f"C={c} {prec}": figures})
            clipped = figures["clipped_rotations"]
            ctx.check(f"no rotation outgrew its plan, C={c} {prec}", clipped == 0, f"{clipped} clipped")
            _free(ctx.device)


def _optimizer_step(dev: torch.device, c: int, k: int, prec: str, repeats: int) -> dict:
    """One ManifoldAdam step on k C x C matrices (NAdam, Lookahead, Lie-form gradients) with
    ``prec`` products: seconds and counted TFLOP per matrix, and the time at the datasheet peak."""
    g = torch.Generator(dev).manual_seed(c)
    xs = [mark_lie_gradient(OrthogonalParameter(random_orthogonal(c).to(dev))) for _ in range(k)]
    opt = ManifoldAdam(xs, lr=1e-3, nesterov=True, lookahead_k=5, precision=prec)

    def step() -> None:
        for x in xs:
            x.grad = 1e-3 * torch.randn(c, c, device=dev, generator=g)
        opt.step()
    step()                                                  # the plans' refresh
    seconds = median(time_calls(step, repeats, 1, dev))
    flops = _counted(step)
    peak = peak_tflops(dev, kind=prec)
    return {"matrices": k, "seconds_per_matrix": seconds / k, "TFLOP_per_matrix": flops / k / 1e12,
            "computed_seconds_per_matrix (counted FLOPs at the datasheet peak)":
                flops / k / (peak * 1e12) if peak else None,
            "clipped_rotations": opt.clipped_rotations()}


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _train_step(model: torch.nn.Module, batch: int, image_size: int, dev: torch.device,
                num_classes: int) -> Callable[[], None]:
    """One training step as the trainer takes it (bf16 autocast, EMMA, backward, ManifoldAdam)."""
    model.validate_inputs = False
    opt = build_optimizer(model)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, device=dev, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=dev, generator=g)
    lip = model.lipschitz_bound()

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(x)
        loss = emma_loss(logits.float(), y, model.head_weight(), lip, 36 / 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def stage_1b(ctx: StageContext) -> None:
    dev = ctx.device
    name, image, batch, classes = ctx.size(("lipnext_l32w4096", 224, 128, 1000), ("lipnext_l4w64", 32, 8, 10))
    t0 = time.perf_counter()
    model = set_compile(bench_model(name, dev, image_size=image, num_classes=classes), "auto")
    ctx.record(model=name, batch=batch, build_s=time.perf_counter() - t0,
               params=sum(p.numel() for p in model.parameters()),
               paper_images_per_gpu_s=PAPER_1B_IMAGES_PER_GPU_S)
    ctx.record(one_block_step_s=_block_step(model.blocks[0], batch, image // model.patch_size,
                                            model.cfg.width, dev, ctx.size(5, 1)))
    _free(dev)
    for checkpointing in (False, True):
        label = f"whole step{' (checkpointing)' if checkpointing else ''}"
        if checkpointing:
            _enable_activation_checkpointing(model)
        figures = _measured_step(model, batch, image, dev, classes, ctx.size(3, 1), PAPER_1B_IMAGES_PER_GPU_S)
        ctx.record(**{label: figures})
        if isinstance(figures, dict):
            break
    ctx.check("a 1B step at 128 images fits one GPU", any(isinstance(ctx.results.get(k), dict) for k in
              ("whole step", "whole step (checkpointing)")), "with or without activation checkpointing")


def _block_step(block: torch.nn.Module, batch: int, grid: int, width: int, dev: torch.device,
                repeats: int) -> float:
    """Seconds of one block's bf16 forward, backward (also into its input) and update."""
    tokens = torch.randn(batch, grid, grid, width, device=dev, requires_grad=True)
    opt = build_optimizer(block)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = block(tokens)
        opt.zero_grad(set_to_none=True)
        out.float().square().mean().backward()
        opt.step()
    return median(time_calls(step, repeats, 3, dev))


def _measured_step(model: torch.nn.Module, batch: int, image: int, dev: torch.device, classes: int,
                   repeats: int, paper_rate: float) -> dict | str:
    """Seconds, images/s (and the share of the paper's per-GPU rate) and peak memory of training
    steps at ``batch``, or "out of memory" (the memory is freed after the error is gone)."""
    _free(dev)
    try:
        step = _train_step(model, batch, image, dev, classes)
        seconds = median(time_calls(step, repeats, 1, dev))
    except torch.cuda.OutOfMemoryError:
        outcome: dict | str = "out of memory"
    else:
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        outcome = {"seconds": seconds, "images_per_s": batch / seconds, "of_paper_rate": batch / seconds / paper_rate,
                   "peak_memory": _bytes(peak) if peak else None,
                   "peak_bytes_per_param": peak / sum(p.numel() for p in model.parameters()) if peak else None}
    model.zero_grad(set_to_none=True)
    step = None                      # the optimizer and its state go before the memory is freed
    _free(dev)
    return outcome


def stage_2b(ctx: StageContext) -> None:
    dev = ctx.device
    name, image, classes, cap = ctx.size(("lipnext_2b", 224, 1000, 4096), ("lipnext_l4w64", 32, 10, 16))
    model = set_compile(bench_model(name, dev, image_size=image, num_classes=classes), False)
    _enable_activation_checkpointing(model)
    params = sum(p.numel() for p in model.parameters())
    ctx.record(model=name, params=params, compiled=False, activation_checkpointing=True,
               paper_images_per_gpu_s=PAPER_2B_IMAGES_PER_GPU_S,
               note="eager blocks: a compiled block recompiles for each batch size the search tries")
    fits, fails, tries = 0, None, {}
    batch = ctx.size(32, 2)
    while batch and batch <= cap:
        outcome = _measured_step(model, batch, image, dev, classes, 1, PAPER_2B_IMAGES_PER_GPU_S)
        tries[batch] = outcome
        ctx.record(tries=tries)
        if isinstance(outcome, dict):
            fits = batch
            batch = batch * 2 if fails is None else (batch + fails) // 2
        else:
            fails = batch
            batch = (fits + batch) // 2
        if fails is not None and (fails - fits <= max(8, fits // 8) or batch in tries):
            break
    best = tries.get(fits, {})
    ctx.record(largest_batch=fits, at_largest=best)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        ctx.check("2B trains on one GPU", fits >= 1, f"largest batch {fits} on {_bytes(total)}; "
                  f"peak {best.get('peak_memory') if isinstance(best, dict) else best}")
