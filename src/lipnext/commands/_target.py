"""What `lipnext certify` and `lipnext verify` evaluate: a saved model, a dataset split
and radii, taken from the command line or else from a run folder's config.yaml."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..options import RULES, SPLITS

DEFAULT_RADII, DEFAULT_UNIT = [36.0, 72.0, 108.0, 255.0], 255.0


@dataclass
class Target:
    path: Path
    model: Any
    dataset: Any
    data: str
    radii: list[float]
    unit: float


def add_target_arguments(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The options `lipnext certify` and `lipnext verify` share: the model, the data split,
    the radii, the rule, the batch size and the device."""
    p.add_argument("model", help="run folder, checkpoint folder, .safetensors weights, URL#sha256=HEX "
                   "or hf-hub:ORG/NAME[@REV]")
    p.add_argument("--data", default=None, help="dataset spec: digits, npz:<file>, <file>.npz, "
                   "cifar10:<dir>, cifar100:<dir>, tiny-imagenet:<dir>")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--holdout", type=int, default=None, help="digits/npz: last N images are the test split")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="radii in units of 1/--radius-unit (default: the run's certify.radii, else "
                   + " ".join(f"{r:g}" for r in DEFAULT_RADII) + ")")
    p.add_argument("--radius-unit", type=float, default=None,
                   help=f"radii are divided by this (default: the run's certify.radius_unit, else "
                   f"{DEFAULT_UNIT:g}; 1 = plain radii)")
    p.add_argument("--rule", default="pairwise", choices=RULES, help="certificate rule (default pairwise)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    p.add_argument("--device", default="cpu")


def load_target(args: argparse.Namespace, verb: str) -> Target:
    """Resolve --data/--holdout/--val-fraction/--radii/--radius-unit against the run's config."""
    import yaml

    from ..config import config_from_dict, dataset_options
    from ..data import get_dataset
    from ..hub import is_remote
    from ..io import load_model

    remote = is_remote(args.model)                 # a URL or hf-hub: name (lipnext.hub)
    path = Path(args.model)
    if not remote and not path.exists():
        raise FileNotFoundError(f"no run folder or weights at {path}")
    data, opts, radii, unit = args.data, {}, args.radii, args.radius_unit
    run_cfg = path / "config.yaml" if not remote and path.is_dir() else None
    if run_cfg is not None and run_cfg.is_file() and (data is None or radii is None):
        try:
            cfg = config_from_dict(yaml.safe_load(run_cfg.read_text()))
        except (ValueError, yaml.YAMLError) as e:
            raise ValueError(f"{run_cfg} is not a readable training config "
                             f"({str(e).splitlines()[0]}); give --data SPEC and --radii") from None
        if data is None:
            data = cfg.data.name
            opts = dataset_options(cfg)
        if radii is None:
            radii = [float(r) for r in cfg.certify.radii]
            unit = unit or float(cfg.certify.radius_unit)
    if data is None:
        raise ValueError(f"say which data to {verb} on: --data SPEC (e.g. --data digits)")
    if args.holdout is not None:
        opts["holdout"] = args.holdout
    if args.val_fraction is not None:
        opts["val_fraction"] = args.val_fraction
    model = load_model(args.model, args.device)
    ds = get_dataset(data, args.split, **opts)
    if ds.num_classes != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {ds.num_classes}")
    return Target(path, model, ds, data, radii or list(DEFAULT_RADII), unit or DEFAULT_UNIT)
