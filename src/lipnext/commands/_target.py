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


def check_target_arguments(args: argparse.Namespace) -> None:
    """The numbers and the device of the command line, before anything is loaded."""
    import math

    for name, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                             ("--holdout", args.holdout, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}"
                             + (" (leave it out to use every image)" if name == "--limit" else ""))
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction:g}")
    if args.radii is not None and not all(math.isfinite(r) and r >= 0 for r in args.radii):
        raise ValueError(f"--radii must be finite radii >= 0 (in units of 1/--radius-unit), got "
                         f"{' '.join(f'{r:g}' for r in args.radii)}")
    if args.radius_unit is not None and not (math.isfinite(args.radius_unit) and args.radius_unit > 0):
        raise ValueError(f"--radius-unit must be > 0 (255: radii in 1/255; 1: plain radii), got {args.radius_unit:g}")
    check_device(args.device)


def check_device(name: str) -> None:
    """A device this machine has: cpu, cuda (if CUDA is available), cuda:N (N < the GPUs)."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def run_folder(path: Path) -> Path | None:
    """The run folder that ``path`` (a run folder, one of its checkpoint folders, or a weights
    file in either) belongs to: the folder holding its config.yaml; None for loose weights."""
    if path.is_file():
        return run_folder(path.parent)
    if (path / "config.yaml").is_file():
        return path
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def _run_config(run: Path) -> Any:
    import yaml

    from ..config import config_from_dict

    run_cfg = run / "config.yaml"
    try:
        return config_from_dict(yaml.safe_load(run_cfg.read_text()))
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{run_cfg} is not a readable training config "
                         f"({str(e).splitlines()[0]}); give --data SPEC and --radii") from None


def _run_data(run: Path) -> dict[str, Any] | None:
    """The data record in the run's run.json (None for a run of lipnext 0.1.0)."""
    import json

    record = run / "run.json"
    return json.loads(record.read_text()).get("data") if record.is_file() else None


def _legacy_data(cfg: Any) -> dict[str, Any]:
    """A data record rebuilt from a run's config.yaml (no sha256; the data's size is read)."""
    from ..config import dataset_options
    from ..data import get_dataset, split_options
    from ..provenance import split_indices_sha256, split_sets

    d = cfg.data
    holdout, val_fraction = split_options(d.name, d.holdout, d.val_fraction)
    opts = {k: v for k, v in dataset_options(cfg).items() if k not in ("holdout", "val_fraction")}
    pool = len(get_dataset(d.name, "train", **({"holdout": 0} if holdout is not None else {}),
                           val_fraction=0.0, **opts))
    return {"spec": d.name, "sha256": None, "holdout": holdout, "val_fraction": val_fraction, "pool": pool,
            "test_pool": None, "split_indices_sha256": split_indices_sha256(split_sets(pool, holdout, val_fraction))}


def _same_path(a: str, b: str) -> bool:
    """Whether two dataset specs name the same data by kind and (resolved) path."""
    import os

    from ..data import parse_spec

    (ka, pa), (kb, pb) = parse_spec(a), parse_spec(b)
    return ka == kb and (os.path.realpath(pa) if pa else "") == (os.path.realpath(pb) if pb else "")


def _check_split(run: Path, cfg: Any, data: dict[str, Any] | None, spec: str, from_run: bool, split: str,
                 holdout: int | None, val_fraction: float | None) -> None:
    """Refuse a val or test split that holds images the run trained on (same data, another cut)."""
    from ..data import split_options
    from ..provenance import data_sha256, split_overlap

    if split == "train":
        return
    if data is None or data.get("sha256") is None:        # a run of lipnext 0.1.0: by name
        if not (from_run or _same_path(spec, cfg.data.name)):
            return
        data = _legacy_data(cfg)
    else:
        sha = data_sha256(spec)[0]
        if sha is None:                                   # no data there: get_dataset says so
            return
        if from_run and sha != data["sha256"]:
            raise ValueError(f"the data at {spec} is not the data {run} was trained on (its sha256 "
                             f"changed since the run): give --data SPEC to certify on it anyway")
        if sha != data["sha256"]:
            return
    h, vf = split_options(spec, holdout, val_fraction)
    n = split_overlap(data, split, h, vf)
    if n:
        cut = f"holdout {h}, val_fraction {vf:g}" if h is not None else f"val_fraction {vf:g}"
        run_cut = (f"data.holdout={data['holdout']}, data.val_fraction={data['val_fraction']:g}"
                   if data["holdout"] is not None else f"data.val_fraction={data['val_fraction']:g}")
        raise ValueError(f"{n} images of this {split} split ({cut}) are images {run} trained on "
                         f"(it was trained with {run_cut}); certify on the run's own split (leave out "
                         "--holdout and --val-fraction), or say --split train to use training images "
                         "on purpose")


def load_target(args: argparse.Namespace, verb: str) -> Target:
    """Resolve --data/--holdout/--val-fraction/--radii/--radius-unit against the run's config
    (and run.json), after checking the command line; refuse a split that overlaps the run's
    training images."""
    from ..config import dataset_options
    from ..data import get_dataset, parse_spec
    from ..hub import is_remote
    from ..io import load_model
    from ..provenance import record_data_spec

    check_target_arguments(args)
    remote = is_remote(args.model)                 # a URL or hf-hub: name (lipnext.hub)
    path = Path(args.model)
    if not remote and not path.exists():
        raise FileNotFoundError(f"no run folder or weights at {path}")
    data, opts, radii, unit = args.data, {}, args.radii, args.radius_unit
    run = None if remote else run_folder(path)
    cfg = _run_config(run) if run is not None else None
    run_data = _run_data(run) if run is not None else None
    from_run = data is None and cfg is not None
    if from_run:
        data = cfg.data.name
        moved = record_data_spec(run_data, run) if run_data and run_data.get("path") else None
        if moved and not Path(parse_spec(data)[1]).exists() and Path(parse_spec(moved)[1]).exists():
            data = moved                      # the run folder moved: its recorded path still leads there
        opts = dataset_options(cfg)
    if cfg is not None:
        radii = radii if radii is not None else [float(r) for r in cfg.certify.radii]
        unit = unit if unit is not None else float(cfg.certify.radius_unit)
    if data is None:
        raise ValueError(f"say which data to {verb} on: --data SPEC (e.g. --data digits)")
    if args.holdout is not None:
        opts["holdout"] = args.holdout
    if args.val_fraction is not None:
        opts["val_fraction"] = args.val_fraction
    if cfg is not None:
        _check_split(run, cfg, run_data, data, from_run, args.split, opts.get("holdout"), opts.get("val_fraction"))
    if run == path and not (path / "model.safetensors").exists():
        ckpts = sorted((path / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"{path} has no model.safetensors: the run has not finished"
                                + (f"; certify its last checkpoint: {ckpts[-1]}" if ckpts else ""))
    model = load_model(args.model if remote else path, args.device)
    ds = get_dataset(data, args.split, **opts)
    if ds.num_classes != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {ds.num_classes}")
    return Target(path, model, ds, data, radii or list(DEFAULT_RADII),
                  unit if unit is not None else DEFAULT_UNIT)
