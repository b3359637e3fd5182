"""`lipnext bench`: speed, memory and FLOPs of named models side by side (ratios against
LipNeXt measured in the same run), the orthogonal-update comparison (``--orthogonal``)
and the wall-clock budget race (``--race``). Named benchmarks: ``lipnext bench step``
(the training step against an unconstrained twin), ``exp`` (FastExp and the manifold step),
``scale`` (the optimizer per rank at 1B and 2B), ``fsdp-memory`` (per-rank memory under
FSDP), ``baselines`` (the runs behind the baseline tables) and ``gpu`` (the GPU check: every
CUDA default validated, then the paper's headline figures measured, in a fixed budget)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark models, orthogonal updates, or race them on a budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv, default=_csv("lipnext_l8w128,liresnet_l7w64,bronet_l6w96"),
                   help="comma-separated model names (the first LipNeXt one is the reference)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--image-size", type=int, default=32, help="input size (default 32)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--dtype", type=_csv, default=["fp32"], help="fp32,bf16 (bf16 = autocast)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="measure every row this many times over; each figure is reported as the "
                        "median with its min-max (default 3; not for --race)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of the device for MFU (default: known GPUs' bf16 dense peak)")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--orthogonal", action="store_true",
                   help="compare orthogonal-update methods (FastExp vs matrix_exp, Cayley, geoopt, "
                        "geotorch, torch parametrizations, orthogonium, deel-torchlip)")
    p.add_argument("--sizes", type=_ints, default=[256, 1024, 4096],
                   help="matrix sizes C for --orthogonal (default 256,1024,4096)")
    p.add_argument("--methods", type=_csv, default=None, help="subset of methods for --orthogonal")
    p.add_argument("--race", action="store_true", help="train each model for the same wall-clock "
                   "budget on the same data, then certify the held-out images")
    p.add_argument("--data", default="npz:../shared/data/cifar10-subset.npz", help="dataset spec (race)")
    p.add_argument("--holdout", type=int, default=1000, help="last N images held out (race)")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="per model (race)")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate (race)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    names = p.add_subparsers(dest="bench", metavar="NAME", required=False,
                             help="a named benchmark (default: the model benchmark above)")
    _add_step(names)
    _add_exp(names)
    _add_scale(names)
    _add_fsdp_memory(names)
    _add_baselines(names)
    _add_gpu(names)


def _add_gpu(names: argparse._SubParsersAction) -> None:
    what = ("the GPU check: validation (numerics, compile, training with every CUDA default, "
            "pytest -m gpu), then measurement (L32W1024, the optimizer, 1B, 2B on one GPU), each "
            "stage in its own process, within --budget seconds (docs/BENCHMARKS.md, GPU check)")
    p = names.add_parser("gpu", help=what, description=what)
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds for all stages together (default 470: 8 minutes with start-up)")
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes on the CPU")
    p.add_argument("--stages", type=_csv, default=None,
                   help="only these stages, in this order (default: all; e.g. for a rerun)")
    p.add_argument("--out", default="runs/gpu", help="where gpu.json and gpu.md go (default runs/gpu)")
    p.set_defaults(func=_run_gpu)


def _run_gpu(args: argparse.Namespace) -> int:
    from ..bench.gpu import run_gpu_check
    rc = run_gpu_check(args.out, args.budget, args.smoke, args.stages)
    print(f"wrote {Path(args.out) / 'gpu.json'} and {Path(args.out) / 'gpu.md'}")
    return rc


def _add_step(names: argparse._SubParsersAction) -> None:
    what = "training-step time of LipNeXt, as the trainer runs it, against an unconstrained twin"
    p = names.add_parser("step", help=what, description=what)
    p.add_argument("--model", default="lipnext_l8w128")
    p.add_argument("--depth", type=int, help="number of blocks (default: the model's)")
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--lipschitz-every", type=int, nargs="+", default=[1], metavar="N")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--exp-sizes", type=int, nargs="*", default=[1024])
    p.add_argument("--exp-norms", type=float, nargs="*", default=[2.0, 4.0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the LipNeXt blocks (lipnext.models.set_compile; twin eager)")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_run_step)


def _run_step(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from ..bench.step import run_step
    print(run_step(args.model, args.depth, args.batch, args.lipschitz_every, args.image_size,
                   args.repeats, args.exp_sizes, args.exp_norms, args.compile, args.json))
    return 0


def _add_exp(names: argparse._SubParsersAction) -> None:
    what = "FastExp against torch.linalg.matrix_exp, and one ManifoldAdam step stacked vs one group each"
    p = names.add_parser("exp", help=what, description=what)
    p.add_argument("--sizes", type=int, nargs="*", default=[256, 1024], help="C for fast_exp vs matrix_exp (none: skip)")
    p.add_argument("--norms", type=float, nargs="+", default=[0.1, 0.5],
                   help="Frobenius norms of the skew input")
    p.add_argument("--step-sizes", type=int, nargs="*", default=[128, 256], help="C for the ManifoldAdam step (none: skip)")
    p.add_argument("--stack", type=int, default=16, help="matrices per stack")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--plans", type=int, nargs="*", default=[], metavar="C",
                   help="print FastExp's plans for NAdam-like steps at these widths (computed)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.set_defaults(func=_run_exp)


def _run_exp(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from ..bench.exp import run_exp
    print(run_exp(args.sizes, args.norms, args.step_sizes, args.stack, args.repeats, args.device,
                  args.plans, args.json))
    return 0


def _add_scale(names: argparse._SubParsersAction) -> None:
    what = ("the manifold optimizer per rank at 1B and 2B widths: measured FLOPs and bytes, "
            "measured DDP scaling (gloo), computed H100 times")
    p = names.add_parser("scale", help=what, description=what)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 5792])
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--measure-chunk", type=int, default=1, help="matrices in the full-width run")
    p.add_argument("--scaling-width", type=int, default=1024)
    p.add_argument("--scaling-matrices", type=int, default=8)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_run_scale)


def _run_scale(args: argparse.Namespace) -> int:
    from ..bench.scale import run_scale
    run_scale(args.widths, args.chunk_size, args.measure_chunk, args.scaling_width, args.scaling_matrices,
              args.worlds, args.steps, args.threads, args.json)
    return 0


def _add_fsdp_memory(names: argparse._SubParsersAction) -> None:
    what = "per-rank memory of FSDP training state against one unsharded process (CPU, gloo)"
    p = names.add_parser("fsdp-memory", help=what, description=what)
    p.add_argument("--model", default="lipnext_l16w512")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_run_fsdp_memory)


def _run_fsdp_memory(args: argparse.Namespace) -> int:
    from ..bench.fsdp_memory import run_fsdp_memory
    print(run_fsdp_memory(args.model, args.worlds, args.batch, args.threads, args.json))
    return 0


def _add_baselines(names: argparse._SubParsersAction) -> None:
    what = "the lipnext bench runs behind docs/BENCHMARKS.md's baseline tables, one after the other"
    p = names.add_parser("baselines", help=what, description=what)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of a few minutes")
    p.add_argument("--race", action="store_true", help="also the 10-minute budget race")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=_run_baselines)


def _run_baselines(args: argparse.Namespace) -> int:
    from ..bench.baselines import run_baselines
    return run_baselines(args.out, args.quick, args.race)


def _threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise ValueError("--batch, --steps and --repeats must be >= 1 and --warmup >= 0")
    _threads(args.threads)
    out = Path(args.out)
    if args.race:
        from ..bench.race import RaceConfig, run_race
        if args.budget_minutes <= 0:
            raise ValueError("--budget-minutes must be positive")
        cfg = RaceConfig(data=args.data, holdout=args.holdout, budget_s=60 * args.budget_minutes,
                         batch=args.batch, lr=args.lr, seed=args.seed, threads=args.threads)
        run_race(args.models, cfg, out, log=lambda s: print(s, flush=True))
        print((out / "race.md").read_text())
        print(f"wrote {out / 'race.json'} and {out / 'race.md'}")
        return 0
    if args.orthogonal:
        from ..bench.orthogonal import run_orthogonal
        md = run_orthogonal(args.sizes, out, methods=args.methods, steps=args.steps,
                            warmup=args.warmup, device=args.device, repeats=args.repeats)
    else:
        from ..bench.models import run_model_bench
        md = run_model_bench(args.models, out, batch=args.batch, image_size=args.image_size,
                             num_classes=args.num_classes, dtypes=args.dtype, steps=args.steps,
                             warmup=args.warmup, device=args.device, peak_tflops=args.peak_tflops,
                             threads=args.threads, repeats=args.repeats)
    print(md)
    return 0
