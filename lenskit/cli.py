"""The ``lenskit`` command line: one subcommand per module in :mod:`lenskit.commands`.

Bad input (a :class:`~lenskit.errors.LenskitError`) prints one line to stderr and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lenskit.errors import LenskitError

__all__ = ["COMMANDS", "build_parser", "main"]

# Each module defines ``register(subparsers)``, which adds its parser and sets
# ``func`` to a ``run(args) -> int`` callable.
COMMANDS = ("trajectory", "train", "fit-jacobian", "eval", "causal-basis")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="lenskit", description="Layer-by-layer lenses on transformer language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lenskit.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LenskitError as err:
        print(f"lenskit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lenskit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
