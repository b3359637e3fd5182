"""`lipnext certify <run folder | weights.safetensors | checkpoint> --data SPEC`:
certified accuracy of a saved model on a dataset split, as a table (and JSON / a plot)."""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from ._target import add_target_arguments, load_target, run_folder


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certify a saved model on a dataset split",
                       description="Clean accuracy and certified robust accuracy (CRA) of a "
                       "saved model. Without --data, a run folder's own config.yaml names the data.")
    add_target_arguments(p, batch_size=512)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="save the certified-accuracy curve here (.png)")
    p.add_argument("--per-sample", default=None, metavar="FILE",
                   help="write every image's index, label, prediction, margin and radius here (.csv or .npz)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.evaluate import certify_dataset
    from ..engine.run_folder import RUN_FILES
    from ..engine.trainer import radius_label
    from ..report import format_table, plot_certified_accuracy, results_dict, write_json
    from ..runlock import run_lock

    if args.per_sample:
        from ..samples import SUFFIXES
        if not args.per_sample.lower().endswith(SUFFIXES):
            raise ValueError(f"--per-sample {args.per_sample}: name the file .csv or .npz")
    outputs = [Path(p) for p in (args.out, args.plot, args.per_sample) if p]
    for opt, p in (("--out", args.out), ("--plot", args.plot)):
        if p and Path(p).is_dir():
            raise IsADirectoryError(f"{opt} {p} is a folder; give a file name (e.g. {Path(p) / 'certify.json'})"
                                    if opt == "--out" else f"{opt} {p} is a folder; give a .png file name")
        if p and Path(p).name in RUN_FILES and run_folder(Path(p).parent) is not None:
            raise ValueError(f"{opt} {p} would replace the run's own {Path(p).name}; choose another name")
    t = load_target(args, "certify")
    target, model, ds, data, radii, unit = t.path, t.model, t.dataset, t.data, t.radii, t.unit
    with ExitStack() as locks:             # one writer per folder written to
        for folder in dict.fromkeys(p.parent for p in outputs):
            locks.enter_context(run_lock(folder, "lipnext certify"))
        cert = certify_dataset(model, ds, args.rule, args.batch_size, args.limit)
        res = results_dict(cert, [r / unit for r in radii], labels=[radius_label(r, unit) for r in radii],
                           dataset=data, split=args.split, model_path=str(target))
        print(f"{target} on {data} ({args.split}, {len(cert)} images):")
        print(format_table(res), flush=True)       # on the terminal before anything is written
        if args.out:
            write_json(res, args.out)
        if args.per_sample:
            from ..samples import write_per_sample
            print(f"per-image certificates: {write_per_sample(cert, args.per_sample)}")
        if args.plot:
            plot_certified_accuracy(cert, args.plot, marks=[r / unit for r in radii],
                                    mark_labels=[radius_label(r, unit) for r in radii],
                                    title=f"{target.name} on {data} ({args.split}, {len(cert)} images)")
    return 0
