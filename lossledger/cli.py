"""The ``lossledger`` command line (``python -m lossledger`` works the same)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import LedgerError
from .ledger import open as open_ledger


def _info(args: argparse.Namespace) -> int:
    print(open_ledger(args.path).info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lossledger", description="Per-sample loss trajectories of training runs, and the scores they give."
    )
    parser.add_argument("--version", action="version", version=f"lossledger {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="summarize a ledger: samples, classes, runs, ticks, streams")
    info.add_argument("path", help="the ledger folder")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 a ledger error, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except LedgerError as err:
        print(f"lossledger {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
