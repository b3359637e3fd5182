"""The validation stages of the GPU check (``bench.gpu``): each proves on the device what the
CPU test suite can only emulate, against CPU/float64 references, and records its figures.

* ``env``: the device, torch and CUDA; bf16, TF32 and fp32 GEMM rates against the datasheet.
* ``numerics``: the three precisions' products within their error bounds, FastExp at two widths,
  orthogonality drift over many steps per precision, Newton–Schulz retraction, and the bound
  and certificates equal to the CPU's (the float64 twin runs on the device).
* ``compile``: compiled blocks against eager in fp32 and bf16 (values, gradients), the number
  of graphs over train, eval and a last partial batch (no recompilation storm), and
  activation checkpointing around compiled blocks.
"""
from __future__ import annotations

import math
import platform
import time

import torch
import torch.nn.functional as F

from ..certify import certify
from ..engine.trainer import _enable_activation_checkpointing
from ..losses import emma_loss
from ..models.lipnext import set_compile
from ..nn import random_orthogonal
from ..ops.exp import exp_plans, fast_expm1
from ..ops.precision import product
from ..optim import exp_update, polar_retract
from .exp import nadam_like_step
from .gpu_context import StageContext
from .models import bench_model
from .timing import median, peak_tflops, time_calls

__all__ = ["stage_compile", "stage_env", "stage_numerics"]

_DRIFT_STEP, _DRIFT_TOTAL = 1e-6, 1e-4       # orthogonality limits (docs/BENCHMARKS.md, drift)


def stage_env(ctx: StageContext) -> None:
    dev = ctx.device
    facts = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        facts.update(device_name=props.name, cuda=torch.version.cuda,
                     memory_GiB=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                     cudnn=torch.backends.cudnn.version())
    ctx.record(**facts)
    ctx.check("a CUDA device", dev.type == "cuda" or ctx.smoke, f"device {dev}")
    n = ctx.size(8192, 256)
    g = torch.Generator(dev).manual_seed(0)
    a = torch.randn(1, n, n, device=dev, generator=g)
    b = torch.randn(1, n, n, device=dev, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    tf32, fp32 = product("tf32", dev), product("fp32", dev)
    rates = {}
    for kind, fn in (("bf16", lambda: a16 @ b16), ("tf32", lambda: tf32.mm(a, b)),
                     ("fp32", lambda: fp32.mm(a, b))):
        seconds = median(time_calls(fn, ctx.size(10, 2), 3, dev))
        tflops = 2 * n ** 3 / seconds / 1e12
        peak = peak_tflops(dev, kind=kind)
        rates[kind] = {"n": n, "TFLOP/s": tflops, "datasheet": peak,
                       "of_datasheet": tflops / peak if peak else None}
        ctx.record(gemm=rates)


def stage_numerics(ctx: StageContext) -> None:
    dev, cpu = ctx.device, torch.device("cpu")
    _products(ctx, dev)
    _fast_exp(ctx, dev)
    _drift(ctx, dev)
    _retraction(ctx, dev)
    _fft_constant(ctx, dev)
    _certificates(ctx, dev, cpu)


def _fft_constant(ctx: StageContext, dev: torch.device) -> None:
    """The FFT error constant that BRONet's float64 step assumes (``rounding.FFT_CONSTANT`` = 64),
    measured on the device's FFT against a long-double FFT on the host (0.32 on the CPU)."""
    from ..verify.precision import fft_error_constant
    grids = ((4, 4), (7, 5), (8, 8)) if ctx.smoke else ((4, 4), (7, 5), (8, 8), (14, 14), (16, 16), (28, 28),
                                                       (32, 32), (56, 56), (64, 64))
    measured = fft_error_constant(dev, grids=grids, trials=2)
    ctx.record(fft_constant=measured)
    worst = max(measured["constant"].values())
    ctx.check("the device's FFT error is within the assumed constant", worst < measured["assumed"] / 8,
              f"measured {worst:.2f} u (log2 N + 1) ||x||, assumed {measured['assumed']:g}")


def _products(ctx: StageContext, dev: torch.device) -> None:
    """|fl(AB) - AB| <= c_n |A| |B| entrywise for each precision (``Precision.error_constant``)."""
    n = ctx.size(1024, 64)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, n, n, generator=g), torch.randn(1, n, n, generator=g)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    with ctx.part("products") as out:
        for name in ("fp32", "tf32", "bf16"):
            prec = product(name, dev)
            got = prec.mm(a.to(dev), b.to(dev)).double().cpu()
            ratio = float(((got - exact).abs() / (prec.error_constant(n) * scale)).max())
            out[name] = {"n": n, "error_over_bound": ratio}
            ctx.check(f"{name} product within its error bound", ratio <= 1.0,
                      f"max |error| / bound = {ratio:.3g} (n = {n})")


def _fast_exp(ctx: StageContext, dev: torch.device) -> None:
    """FastExp on the device against float64 matrix_exp, at later-step norms (||U||_F = 3e-4 C)
    and a Lookahead rotation's (7.5e-4 C), per precision: error <= 1e-5 + 8 u_op ||U||_F (the
    low-precision operands' share; ||U||_F >= ||U||_2)."""
    with ctx.part("fast_exp") as out:
        for c in ctx.size((1024, 4096), (32, 64)):
            for norm in (3e-4 * c, 7.5e-4 * c):
                a = nadam_like_step(c, norm, seed=c, device=dev)
                want = torch.linalg.matrix_exp(a.double()) - torch.eye(c, dtype=torch.float64, device=dev)
                for name in ("fp32", "tf32", "bf16"):
                    err = float((fast_expm1(a, name, skew=True).double() - want).abs().max())
                    tol = 1e-5 + 8 * product(name, dev).operand_u * norm
                    out[f"C={c} |U|_F={norm:.2f} {name}"] = {"error": err, "tolerance": tol,
                                                             "plan": exp_plans(a, name, skew=True)[0]}
                    ctx.check(f"FastExp {name} C={c} ||U||_F={norm:.2f}", err <= tol,
                              f"max error {err:.2e} (tolerance {tol:.2e})")


def _drift(ctx: StageContext, dev: torch.device) -> None:
    """max|X^T X - I| over NAdam-like steps X <- X exp(U), per precision, on the device."""
    c, steps = ctx.size(1024, 32), ctx.size(1000, 20)
    eye = torch.eye(c, dtype=torch.float64, device=dev)
    with ctx.part("drift") as out:
        for name in ("fp32", "tf32", "bf16"):
            x = random_orthogonal(c).to(dev)
            start = last = float((x.double().T @ x.double() - eye).abs().max())
            worst = 0.0
            for t in range(steps):
                x = exp_update(x, nadam_like_step(c, 3e-4 * c, seed=t, device=dev), precision=name, skew=True)
                if t % 10 == 9 or t == steps - 1:       # growth per step, over blocks of 10
                    now = float((x.double().T @ x.double() - eye).abs().max())
                    worst, last = max(worst, (now - last) / 10), now
            out[name] = {"C": c, "steps": steps, "start": start, "end": last,
                         "growth": last - start, "largest_growth_per_step": worst}
            ctx.check(f"drift {name} over {steps} steps", last - start <= _DRIFT_TOTAL
                      and worst <= _DRIFT_STEP, f"growth {last - start:.2e} (<= {_DRIFT_TOTAL:g}), "
                      f"per step <= {worst:.2e} (<= {_DRIFT_STEP:g})")


def _retraction(ctx: StageContext, dev: torch.device) -> None:
    """Newton–Schulz on the device against the float64 SVD polar factor on the CPU."""
    c = ctx.size(1024, 48)
    g = torch.Generator().manual_seed(2)
    x = random_orthogonal(c) + 1e-3 * torch.randn(c, c, generator=g) / math.sqrt(c)
    want = polar_retract(x, "svd")
    got = polar_retract(x.to(dev), "newton_schulz").cpu()
    err = float((got.double() - want.double()).abs().max())
    ortho = float((got.double().T @ got.double() - torch.eye(c, dtype=torch.float64)).abs().max())
    ctx.record(newton_schulz={"C": c, "max_diff_to_svd": err, "orthogonality": ortho})
    ctx.check("Newton-Schulz = SVD polar factor", err <= 1e-5 and ortho <= 1e-6,
              f"max |NS - SVD| {err:.1e}, max|Q^T Q - I| {ortho:.1e}")


def _certificates(ctx: StageContext, dev: torch.device, cpu: torch.device) -> None:
    """The bound and the certificates of one model on the device and on the CPU (float64 twin
    on each): the same predictions, bounds and radii to float64 rounding."""
    model = bench_model(ctx.size("lipnext_l8w128", "lipnext_l4w64"), cpu, image_size=32)
    g = torch.Generator().manual_seed(3)
    n = ctx.size(256, 16)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    here = certify(model, x, y)
    model.to(dev)
    there = certify(model, x.to(dev), y.to(dev))
    radius = float((there.radius.cpu() - here.radius).abs().max())
    bound = abs(there.lipschitz - here.lipschitz) / here.lipschitz
    same = bool(torch.equal(there.predictions.cpu(), here.predictions))
    ctx.record(certificates={"n": len(x), "lipschitz_cpu": here.lipschitz, "lipschitz_device": there.lipschitz,
                             "bound_rel_diff": bound, "radius_max_diff": radius,
                             "numerics": [here.numerics, there.numerics], "same_predictions": same})
    ctx.check("certificates on the device = on the CPU", same and bound <= 1e-12 and radius <= 1e-9
              and there.proven and here.proven, f"predictions equal {same}, bound rel. diff {bound:.1e}, "
              f"radii differ by <= {radius:.1e}, {there.numerics}")


def stage_compile(ctx: StageContext) -> None:
    dev = ctx.device
    name, batch = ctx.size(("lipnext_l8w128", 256), ("lipnext_l4w64", 8))
    model = bench_model(name, dev, image_size=32)
    model.validate_inputs = False
    g = torch.Generator(dev).manual_seed(4)
    x = torch.rand(batch, 3, 32, 32, device=dev, generator=g)
    y = torch.randint(0, 10, (batch,), device=dev, generator=g)
    lip = model.lipschitz_bound()

    def outputs(amp: bool) -> list[torch.Tensor]:
        """Logits, then the gradient of every parameter."""
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        emma_loss(logits, y, model.head_weight(), lip, 36 / 255).backward()
        return [logits.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    def compare(label: str, ref: list[torch.Tensor], got: list[torch.Tensor], tol: float) -> None:
        diffs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, ref)]
        ctx.record(**{label: {"logits_rel_diff": diffs[0], "grad_rel_diff": max(diffs[1:])}})
        ctx.check(label, max(diffs) <= tol, f"logits {diffs[0]:.1e}, gradients {max(diffs[1:]):.1e} "
                  f"(relative; <= {tol:g})")

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for amp, tol in ((False, 1e-4), (True, 3e-2)):
        label = "bf16" if amp else "fp32"
        set_compile(model, False)
        eager = outputs(amp)
        set_compile(model, True)
        t0 = time.perf_counter()
        compiled = outputs(amp)
        ctx.record(**{f"first compiled step {label} s": time.perf_counter() - t0})
        compare(f"compiled = eager, {label}", eager, compiled, tol)
    graphs = _graphs_over_loop(model, x, y, lip, dev)
    ctx.record(graphs=graphs)
    ctx.check("no recompilation storm", graphs["second_pass_new"] == 0 and graphs["after_first_pass"] <= 8,
              f"{graphs['after_first_pass']} graphs over train, eval and a partial batch "
              f"(fp32 and bf16); {graphs['second_pass_new']} more on a second pass")
    set_compile(model, False)
    reference = outputs(False)
    set_compile(model, True)
    _enable_activation_checkpointing(model)
    compare("checkpointed compiled blocks = eager", reference, outputs(False), 1e-4)


def _graphs_over_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lip: float,
                      dev: torch.device) -> dict[str, int]:
    """Unique graphs after train steps, eval and the last partial batch in fp32 and bf16, and how
    many more a second identical pass adds (``torch._dynamo`` counters)."""
    counters = torch._dynamo.utils.counters

    def one_pass() -> None:
        for amp in (False, True):
            for part in (x, x[: max(1, len(x) - 3)]):            # a full and a last partial batch
                model.train()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(part)
                F.cross_entropy(logits.float(), y[: len(part)]).backward()
                model.eval()
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    model(part)
        model.zero_grad(set_to_none=True)

    one_pass()
    first = counters["stats"]["unique_graphs"]
    one_pass()
    return {"after_first_pass": first, "second_pass_new": counters["stats"]["unique_graphs"] - first,
            "frames": counters["frames"]["total"]}
