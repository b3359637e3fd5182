"""`lipnext demo`: train a small LipNeXt on the built-in digits, certify, print, plot."""
from __future__ import annotations

import argparse

from ..demo import DemoConfig, print_results, run_demo
from ..extras import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="train and certify a small LipNeXt on scikit-learn's digits (CPU, minutes)")
    p.add_argument("--out", default=d.out, help=f"run folder (default {d.out})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--model", default=d.model, help=f"named model (default {d.model})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: the figures of docs/RESULTS.md repeat "
                        "exactly; another number gives slightly different figures)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    require("sklearn", "lipnext demo (its digits data)")
    require("matplotlib", "lipnext demo (its plot)")
    cfg = DemoConfig(out=args.out, epochs=args.epochs, model=args.model, seed=args.seed,
                     threads=args.threads, overwrite=args.overwrite)
    results = run_demo(cfg, progress=not args.quiet)
    print_results(results, cfg.out)
    return 0
