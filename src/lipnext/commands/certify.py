"""`lipnext certify <run folder | weights.safetensors | checkpoint> --data SPEC`:
certified accuracy of a saved model on a dataset split, as a table (and JSON / a plot)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certify a saved model on a dataset split",
                       description="Clean accuracy and certified robust accuracy (CRA) of a "
                       "saved model. Without --data, a run folder's own config.yaml names the data.")
    p.add_argument("model", help="run folder, checkpoint folder or .safetensors weights")
    p.add_argument("--data", default=None, help="dataset spec: digits, npz:<file>, <file>.npz, "
                   "cifar10:<dir>, cifar100:<dir>, tiny-imagenet:<dir>")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--holdout", type=int, default=None, help="digits/npz: last N images are the test split")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="radii in units of 1/--radius-unit (default: the run's, else 36 72 108 255)")
    p.add_argument("--radius-unit", type=float, default=None,
                   help="radii are divided by this (default: the run's, else 255; 1 = plain radii)")
    p.add_argument("--rule", default="pairwise", choices=["pairwise", "sqrt2"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="certify only the first N images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="save the certified-accuracy curve here (.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import get_dataset
    from ..engine.evaluate import certify_dataset
    from ..engine.trainer import radius_label
    from ..io import load_model
    from ..report import format_table, plot_certified_accuracy, results_dict, write_json

    target = Path(args.model)
    if not target.exists():
        raise FileNotFoundError(f"no run folder or weights at {target}")
    data, opts, radii, unit = args.data, {}, [36.0, 72.0, 108.0, 255.0], 255.0
    run_cfg = target / "config.yaml" if target.is_dir() else None
    if run_cfg is not None and run_cfg.is_file():
        import yaml
        saved = yaml.safe_load(run_cfg.read_text()) or {}
        cert_cfg = saved.get("certify") or {}
        radii, unit = cert_cfg.get("radii", radii), cert_cfg.get("radius_unit", unit)
        if data is None:
            d = saved.get("data") or {}
            data = d.get("name")
            opts = {k: d[k] for k in ("holdout", "val_fraction", "num_classes") if d.get(k) is not None}
    radii = args.radii or radii
    unit = args.radius_unit or unit
    if data is None:
        raise ValueError("say which data to certify on: --data SPEC (e.g. --data digits)")
    if args.holdout is not None:
        opts["holdout"] = args.holdout
    if args.val_fraction is not None:
        opts["val_fraction"] = args.val_fraction
    model = load_model(target, args.device)
    ds = get_dataset(data, args.split, **opts)
    if ds.num_classes != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {ds.num_classes}")
    cert = certify_dataset(model, ds, args.rule, args.batch_size, args.limit)
    res = results_dict(cert, [r / unit for r in radii], labels=[radius_label(r, unit) for r in radii],
                       dataset=data, split=args.split, model_path=str(target))
    print(f"{target} on {data} ({args.split}, {len(cert)} images):")
    print(format_table(res))
    if args.out:
        write_json(res, args.out)
    if args.plot:
        plot_certified_accuracy(cert, args.plot, marks=[r / unit for r in radii])
    return 0
