"""`lipnext models`: list the registered named configurations."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named model configurations")
    p.add_argument("pattern", nargs="?", default="", help="only names containing this text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import list_models, model_entry

    names = list_models(args.pattern)
    if not names:
        families = sorted({n.split("_")[0] for n in list_models()})
        raise ValueError(f"no model name contains {args.pattern!r}; the families are "
                         f"{', '.join(families)} (`lipnext models` lists every name)")
    width = max((len(n) for n in names), default=0)
    for name in names:
        arch, _, description = model_entry(name)
        print(f"{name:<{width}}  {arch:<10} {description}")
    return 0
