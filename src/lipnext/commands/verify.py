"""`lipnext verify <run folder | weights.safetensors> --data SPEC`: check that the model's
certificates hold (orthogonality, empirical Lipschitz bound, attacks inside certified
radii, float32 vs float64). Prints a table, writes verify.json and verify.md, and exits
with 1 when any check fails (2 on a usage error)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._target import load_target


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify a saved model's certificates (attacks, bounds, precision)",
                       description="Checks (a) orthogonality of every orthogonal weight, (b) an empirical "
                       "lower bound of the trunk's Lipschitz constant against the claimed bound and the "
                       "head's consistency, (c) PGD with restarts and the DDN minimum-norm attack against "
                       "every certified point within its certified radius, (d) float32 against float64 "
                       "certificates. Exit code 1 when any check fails. Without --data, a run folder's "
                       "config.yaml names the data.")
    p.add_argument("model", help="run folder or .safetensors weights")
    p.add_argument("--data", default=None, help="dataset spec: digits, npz:<file>, <file>.npz, "
                   "cifar10:<dir>, cifar100:<dir>, tiny-imagenet:<dir>")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--holdout", type=int, default=None, help="digits/npz: last N images are the test split")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    p.add_argument("--attack-points", type=int, default=500,
                   help="attack the first N images (0: all; default 500)")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="radii (in units of 1/--radius-unit) for CRA and the empirical robust accuracy "
                   "(default: the run's certify.radii, else 36 72 108)")
    p.add_argument("--radius-unit", type=float, default=None,
                   help="radii are divided by this (default: the run's certify.radius_unit, else 255)")
    p.add_argument("--rule", default="pairwise", choices=["pairwise", "sqrt2"])
    p.add_argument("--steps", type=int, default=100, help="PGD steps (default 100)")
    p.add_argument("--restarts", type=int, default=5, help="PGD restarts (default 5)")
    p.add_argument("--ddn-steps", type=int, default=200, help="DDN minimum-norm attack steps")
    p.add_argument("--era-restarts", type=int, default=1,
                   help="PGD restarts for the empirical robust accuracy at each radius")
    p.add_argument("--lipschitz-steps", type=int, default=200)
    p.add_argument("--lipschitz-restarts", type=int, default=4)
    p.add_argument("--lipschitz-points", type=int, default=32)
    p.add_argument("--no-box", action="store_true",
                   help="attack in all of R^n instead of the image box [0, 1]")
    p.add_argument("--radius-scale", type=float, default=1.0,
                   help="attack within this multiple of each certified radius (default 1: at the radius)")
    p.add_argument("--ortho-tol", type=float, default=1e-4, help="max |X^T X - I| allowed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None,
                   help="folder for verify.json and verify.md (default: the run folder, or next to the weights)")
    p.set_defaults(func=run)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..io import atomic_write
    from ..verify import Budget, verify_model

    for name in ("steps", "restarts", "ddn_steps", "era_restarts", "lipschitz_steps",
                 "lipschitz_restarts", "lipschitz_points", "batch_size", "radius_scale", "limit"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--attack-points", args.attack_points, allow_zero=True)
    _positive("--ortho-tol", args.ortho_tol)
    t = load_target(args, "verify")
    target, model, ds, data, radii, unit = t.path, t.model, t.dataset, t.data, t.radii, t.unit
    x, y = ds.tensors()
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if len(y) == 0:
        raise ValueError(f"the {args.split} split of {data} is empty; choose another split or --holdout")
    _positive("--radii", min(radii), allow_zero=True)
    _positive("--radius-unit", unit)
    budget = Budget(pgd_steps=args.steps, pgd_restarts=args.restarts, ddn_steps=args.ddn_steps,
                    era_restarts=args.era_restarts, lipschitz_steps=args.lipschitz_steps,
                    lipschitz_restarts=args.lipschitz_restarts, lipschitz_points=args.lipschitz_points,
                    attack_points=args.attack_points or None)
    torch.manual_seed(args.seed)
    report = verify_model(model, x.to(args.device), y.to(args.device), eps=[r / unit for r in radii],
                          rule=args.rule, budget=budget, box=not args.no_box,
                          radius_scale=args.radius_scale, ortho_tol=args.ortho_tol, seed=args.seed,
                          batch_size=args.batch_size)
    report.info.update({"weights": str(target), "data": data, "split": args.split,
                        "radii": radii, "radius_unit": unit})
    out = Path(args.out) if args.out else (target if target.is_dir() else target.parent)
    atomic_write(out / "verify.json", lambda tmp: Path(tmp).write_text(report.to_json() + "\n"))
    atomic_write(out / "verify.md", lambda tmp: Path(tmp).write_text(report.to_markdown() + "\n"))
    print(f"{target} on {data} ({args.split}, {len(y)} images):")
    print(report.to_markdown())
    print(f"\nwritten: {out / 'verify.json'}, {out / 'verify.md'}")
    return 0 if report.passed else 1
