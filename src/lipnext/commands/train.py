"""`lipnext train --config configs/<name>.yaml [key=value ...]`: train, then certify.

Run it as is on one CPU or GPU, or under torchrun for several processes/nodes:
``torchrun --nproc-per-node 8 -m lipnext train --config ...`` (same command, DDP).
"""
from __future__ import annotations

import argparse
import shlex
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a certifiable model from a config file",
                       description="Train from a YAML config (configs/*.yaml) with dotted "
                       "overrides, e.g. train.epochs=3 model.name=lipnext_l4w64 run_dir=runs/x.")
    p.add_argument("--config", "-c", default=None,
                   help="YAML config file, or the name of a packaged config: cifar10_l32w1024, demo, ... "
                        "(default: the built-in digits config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run_dir "
                   "(with train.epochs=N: extend the run to N epochs, see docs/TRAINING.md)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty run_dir "
                   "(removes the files a lipnext run writes there, nothing else)")
    p.add_argument("--run-dir", default=None, help="run folder (same as the override run_dir=...)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, to_yaml
    from ..engine import RunWriteError, TrainingDiverged, train

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.resume:
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    again = ["lipnext", *[a for m in getattr(args, "imports", []) for a in ("--import", m)], "train",
             *(["--config", args.config] if args.config else []),
             *[o for o in overrides if o not in ("resume=true", "overwrite=true")
               and not o.startswith("train.stop_at_step=")], "--resume"]
    try:
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"lipnext train: training diverged: {e}", file=sys.stderr)
        return 1
    except RunWriteError as e:             # a full disk mid-run: the checkpoints before it are intact
        if not e.resumable:
            raise
        print(f"lipnext train: error: {e.strerror}:\n  {shlex.join(again)}", file=sys.stderr)
        return 1
    if result.get("interrupted"):
        why = result.get("signal", "train.stop_at_step")
        if cfg.train.checkpoint:
            print(f"stopped at step {result['step']} ({why}); continue with:\n  {shlex.join(again)}")
        return 130 if "signal" in result else 0
    return 0
