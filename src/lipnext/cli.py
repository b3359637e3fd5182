"""The ``lipnext`` command. Each subcommand lives in ``lipnext.commands.<name>`` and
defines ``add_parser(subparsers)`` (which sets ``func``) for argparse."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .extras import missing_extra

# Subcommand modules, in the order `lipnext --help` lists them. A module imports nothing
# heavy (torch) at import time: `lipnext --help` stays fast.
COMMANDS = ["demo", "train", "certify", "verify", "predict", "card", "export", "compare", "models", "bench",
            "study"]

# A user's mistake (bad path, shape, key, value) is reported in one line, no traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipnext", description="Certifiably robust "
                                     "1-Lipschitz classifiers: train, certify, verify, benchmark.")
    parser.add_argument("--version", action="version", version=f"lipnext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (from the Python path or the current folder), e.g. "
                        "a model of your own that registers itself; repeatable")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lipnext.commands.{name}").add_parser(sub)
    return parser


def import_modules(names: list[str]) -> None:
    """Import the ``--import`` modules, the current folder on the path as for ``python -m``."""
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:             # a user's mistake: a one-line error
            raise ValueError(f"--import {name}: {e} (MODULE is imported as by `import MODULE`, "
                             "from the Python path or the current folder)") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_modules(args.imports)
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lipnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:             # an optional dependency: name the extra
        msg = missing_extra(e)
        if msg is None or args.debug:
            raise
        print(f"lipnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
