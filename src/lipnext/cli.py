"""The ``lipnext`` command. Each subcommand lives in ``lipnext.commands.<name>`` and
defines ``add_parser(subparsers)`` (which sets ``func``) for argparse.

Overrides (``KEY=VALUE``) may stand anywhere after the subcommand, before and after its
options (``lipnext train ... --resume train.epochs=6``); anything else unrecognised is a
usage error printed with the subcommand's own usage. A user's mistake is one line on
stderr and exit code 2; a filesystem failure (a full disk) one line and exit code 1; a
closed pipe (``lipnext study --dry-run | head``) ends the command quietly, as Unix tools do."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .extras import missing_extra
from .runlock import RunFolderBusy

# Subcommand modules, in the order `lipnext --help` lists them. A module imports nothing
# heavy (torch) at import time: `lipnext --help` stays fast.
COMMANDS = ["demo", "train", "certify", "verify", "predict", "card", "export", "compare", "models", "bench",
            "study"]

# A user's mistake (bad path, shape, key, value) is reported in one line, no traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError, RunFolderBusy)


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


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)parser that ``args`` went through (``lipnext bench step``'s, say)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None:
            return parser
        parser = subs[0].choices[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``KEY=VALUE`` words after the options join the overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _quiet_stdout() -> None:
    """After a closed pipe: send what is left of stdout to /dev/null (no second error at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_modules(args.imports)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()               # a closed pipe shows here at the latest
        return rc
    except BrokenPipeError:              # the reader went away (| head): stop quietly
        _quiet_stdout()
        return 141                       # 128 + SIGPIPE, what a shell reports for such a writer
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = (e.args[0] if isinstance(e, KeyError) and e.args else
               e.strerror if isinstance(e, OSError) and e.errno is not None and e.strerror else e)
        print(f"lipnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:             # an optional dependency: name the extra
        msg = missing_extra(e)
        if msg is None or args.debug:
            raise
        print(f"lipnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:                 # a full disk, a read-only folder: say which file
        if args.debug:
            raise
        msg = e.strerror or str(e)
        if e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"lipnext {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
