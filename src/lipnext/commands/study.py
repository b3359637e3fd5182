"""`lipnext study STUDY.yaml [key=value ...]`: run a grid of trainings over seeds, then
write one table and one plot (mean and spread over seeds). Rerun it to resume."""
from __future__ import annotations

import argparse


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a study (a grid of overrides x seeds) and tabulate it",
                       description="Run every (cell, seed) of a study file (studies/*.yaml) through the "
                       "trainer, one after the other, skipping finished runs and resuming half-finished "
                       "ones; then write <out>/study.md, .csv, .json and .png.")
    p.add_argument("study", help="study file (YAML), e.g. studies/alpha.yaml")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="run only the runs whose index is I modulo N (one process per device)")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from finished runs")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import collect, format_markdown, load_study, run_state, run_study, summarize, write_outputs
    study = load_study(args.study, args.overrides)
    if args.dry_run:
        for cell, seed in study.runs():
            d = study.run_dir(cell, seed)
            print(f"{run_state(d):>8}  {d}  {' '.join(cell.overrides)}")
        return 0
    records = collect(study) if args.report else run_study(study, args.shard)
    if not records:
        raise ValueError(f"no run of {args.study} has finished yet (in {study.out}); run "
                         f"`lipnext study {args.study}` first")
    paths = write_outputs(study, records)
    print(format_markdown(summarize(records, [c.name for c in study.cells])), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
