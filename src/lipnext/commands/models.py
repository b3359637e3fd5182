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
    width = max((len(n) for n in names), default=0)
    for name in names:
        arch, _, description = model_entry(name)
        print(f"{name:<{width}}  {arch:<10} {description}")
    return 0
