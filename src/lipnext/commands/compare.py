"""`lipnext compare RUN... [--out DIR]`: runs side by side, a table and a CRA-radius plot."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare runs in one table and one plot",
                       description="Model, parameters, data track, epochs, wall time, clean accuracy, CRA at "
                       "each eps and the bound of each run, as a table (printed, compare.md, compare.csv) "
                       "and one plot of certified accuracy against the radius (compare.png). A folder that is "
                       "not a run (a study's output) stands for every finished run below it.")
    p.add_argument("runs", nargs="+", help="run folders, or folders holding runs")
    p.add_argument("--out", default=None, help="folder for compare.md, .csv and .png (default: only print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compare import compare_rows, find_runs, format_markdown, write_compare

    rows = compare_rows(find_runs(args.runs))
    print(format_markdown(rows), end="")
    if args.out:
        paths = write_compare(rows, args.out)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
