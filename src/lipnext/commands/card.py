"""`lipnext card RUN`: (re)write a run's model card, model_card.json and README.md."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="write a run's model card (model_card.json and README.md)",
                       description="Write model_card.json and a README.md (a Hugging Face model card) "
                       "from a finished run folder: architecture, data and split with its sha256, "
                       "clean accuracy, CRA at every eps, the bound, the recipe, provenance, the weights' "
                       "sha256 and, after `lipnext verify RUN --autoattack`, the AutoAttack accuracy.")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--out", default=None, help="write the card here instead of into the run folder")
    p.add_argument("--json", action="store_true", help="also print the card as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..card import read_card, write_card

    json_path, readme = write_card(args.run, args.out)
    if args.json:
        print(json.dumps(read_card(json_path), indent=2))
    print(f"model card: {readme} ({json_path.name} beside it)")
    return 0
