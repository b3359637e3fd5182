"""`lipnext verify <run folder | weights.safetensors> --data SPEC`: check that the model's
certificates hold (orthogonality, empirical Lipschitz bound, attacks inside certified
radii, the float64 rounding bound). Shows a progress bar per check and prints each result as
it is known; ``--budget`` bounds the attacks (points or seconds). Prints a table, writes
verify.json and verify.md, and exits with 1 when any check fails (2 on a usage error)."""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from ._target import add_target_arguments, load_target


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify a saved model's certificates (attacks, bounds, precision)",
                       description="Checks (a) orthogonality of every orthogonal weight, (b) an empirical "
                       "lower bound of the trunk's Lipschitz constant against the claimed bound and the "
                       "head's consistency, (c) PGD with restarts and the DDN minimum-norm attack against "
                       "every certified point within its certified radius (with torchattacks installed also APGD-CE/DLR "
                       "and FAB), and the tightness (closest adversarial / certified radius), (d) the float64 "
                       "twin and its rounding bound. Exit code 1 when any check fails. Without --data, a run folder's "
                       "config.yaml names the data.")
    add_target_arguments(p, batch_size=256)
    p.add_argument("--budget", default="100",
                   help="attack budget: N points (the first N images), Ns seconds (e.g. 120s: attacks stop "
                   "starting new batches after that long), or all (default 100 points: a first result fast)")
    p.add_argument("--attack-points", type=int, default=None,
                   help="attack the first N images (0: all); overrides a --budget in points")
    p.add_argument("--library", choices=["auto", "yes", "no"], default="auto",
                   help="torchattacks APGD-CE/DLR and FAB in addition to PGD and DDN: auto (when installed), "
                   "yes (required), no")
    p.add_argument("--autoattack", action="store_true",
                   help="also run the standard L2 AutoAttack (APGD-CE, APGD-T, FAB-T, Square; torchattacks) at "
                   "every eps on the attacked points and fail unless its robust accuracy >= CRA (minutes per "
                   "100 points on a CPU, see docs/RELIABILITY.md); the figures go into the model card")
    p.add_argument("--no-attacks", action="store_true",
                   help="skip check (c), the attacks at each certified radius (e.g. to run --autoattack alone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="folder for verify.json and verify.md (default: the run folder, next to the weights, "
                   "or the current folder for a URL or hf-hub: model)")
    p.set_defaults(func=run)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_budget(text: str) -> tuple[int | None, float | None]:
    """(points, seconds) from "N", "Ns" or "all"."""
    t = text.strip().lower()
    try:
        if t == "all":
            return None, None
        if t.endswith("s"):
            sec = float(t[:-1])
            if sec > 0:
                return None, sec
        elif int(t) > 0:
            return int(t), None
    except ValueError:
        pass
    raise ValueError(f"--budget must be a number of points (e.g. 200), seconds (e.g. 120s) or all, got {text!r}")


def run(args: argparse.Namespace) -> int:
    from ..hub import is_remote
    from ..runlock import run_lock

    for name in ("steps", "restarts", "ddn_steps", "era_restarts", "lipschitz_steps",
                 "lipschitz_restarts", "lipschitz_points", "radius_scale"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--attack-points", args.attack_points, allow_zero=True)
    points, seconds = parse_budget(args.budget)
    if args.attack_points is not None:
        points = args.attack_points or None
    library = {"auto": None, "yes": True, "no": False}[args.library]
    if library or args.autoattack:
        from ..verify import library_available
        if not library_available():
            raise ValueError(f"{'--autoattack' if args.autoattack else '--library yes'} needs torchattacks: "
                             "pip install --no-deps torchattacks (see docs/RELIABILITY.md)")
    _positive("--ortho-tol", args.ortho_tol)
    target = Path(args.model)
    remote = is_remote(args.model)                 # a URL or hf-hub: name (lipnext.hub)
    if not remote and not target.exists():
        raise FileNotFoundError(f"no run folder or weights at {target}")
    out = Path(args.out) if args.out else Path(".") if remote else (target if target.is_dir() else target.parent)
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out, "lipnext verify"))
        except OSError as e:                   # a read-only folder: say so now, not after the checks
            hint = f"{e.strerror or e}; give --out DIR for verify.json and verify.md"
            raise (OSError(e.errno, hint) if e.errno is not None else type(e)(hint)) from None
        return _verify(args, load_target(args, "verify"), out, library, points, seconds)


def _verify(args: argparse.Namespace, t, out: Path, library: bool | None, points: int | None,
            seconds: float | None) -> int:
    """Run the checks, print the report (on the terminal first), then write verify.json and
    verify.md into ``out``."""
    import torch

    from ..hub import file_sha256, resolve
    from ..io import atomic_write
    from ..verify import Budget, verify_model

    target, model, ds, data, radii, unit = t.path, t.model, t.dataset, t.data, t.radii, t.unit
    x, y = ds.probe(args.limit or len(ds))         # every batch source has probe (streamed too)
    if len(y) == 0:
        raise ValueError(f"the {args.split} split of {data} is empty; choose another split or --holdout")
    budget = Budget(pgd_steps=args.steps, pgd_restarts=args.restarts, ddn_steps=args.ddn_steps,
                    era_restarts=args.era_restarts, lipschitz_steps=args.lipschitz_steps,
                    lipschitz_restarts=args.lipschitz_restarts, lipschitz_points=args.lipschitz_points,
                    attack_points=points, seconds=seconds, library=library)
    torch.manual_seed(args.seed)
    report = verify_model(model, x.to(args.device), y.to(args.device), eps=[r / unit for r in radii],
                          rule=args.rule, budget=budget, box=not args.no_box,
                          radius_scale=args.radius_scale, ortho_tol=args.ortho_tol, seed=args.seed,
                          batch_size=args.batch_size, progress=not args.no_progress, autoattack=args.autoattack,
                          attacks=not args.no_attacks)
    report.info.update({"weights": str(target), "data": data, "split": args.split,
                        "radii": radii, "radius_unit": unit})
    if args.autoattack and "autoattack" in [c.name for c in report.checks]:
        report["autoattack"].details["weights_sha256"] = file_sha256(resolve(args.model))
    print(f"{target} on {data} ({args.split}, {len(y)} images):")
    print(report.to_markdown(), flush=True)
    atomic_write(out / "verify.json", lambda tmp: Path(tmp).write_text(report.to_json() + "\n"))
    atomic_write(out / "verify.md", lambda tmp: Path(tmp).write_text(report.to_markdown() + "\n"))
    print(f"\nwritten: {out / 'verify.json'}, {out / 'verify.md'}")
    if args.autoattack and target.is_dir() and (target / "results.json").is_file() and out == target:
        from ..card import write_card
        print(f"model card with the AutoAttack figures: {write_card(target)[1]}")
    return 0 if report.passed else 1
