"""The ``lenskit`` command line: one subcommand per module in :mod:`lenskit.commands`.

Bad input (a :class:`~lenskit.errors.LenskitError`) prints one line to stderr and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lenskit.allocator import retain_freed_memory
from lenskit.errors import LenskitError

__all__ = ["COMMANDS", "build_parser", "main"]

# Each module defines ``register(subparsers)``, which adds its parser and sets
# ``func`` to a ``run(args) -> int`` callable. Only the command being run is imported;
# the others appear in ``lenskit --help`` with these one-line helps.
COMMANDS = {
    "trajectory": "a prompt's next-token prediction at every layer",
    "train": "train a tuned lens for a model",
    "fit-jacobian": "fit a Jacobian lens (J-lens) for a model",
    "eval": "per-layer lens metrics over a corpus",
    "causal-basis": "find the residual directions of a layer that matter most to a lens",
    "attribute": "each attention and MLP output's effect on one prediction, through a lens",
}


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``commands`` (None: all) get their full parsers, others a stub.

    A stub only names its command in ``lenskit --help``: that needs no heavy import.
    """
    parser = argparse.ArgumentParser(
        prog="lenskit", description="Layer-by-layer lenses on transformer language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        if commands is None or name in commands:
            importlib.import_module(f"lenskit.commands.{name.replace('-', '_')}").register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    return parser


# Arguments that name files, folders or lens specs (KIND:PATH).
PATH_ARGS = ("model", "data", "lens", "out", "json", "figures")


def _check_paths(args: argparse.Namespace) -> None:
    from lenskit.io import check_path_limits

    for dest in PATH_ARGS:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                check_path_limits(value, f"--{dest}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([wanted] if wanted in COMMANDS else [])
    args = parser.parse_args(argv)
    try:
        _check_paths(args)  # a path the system would refuse fails before any work
        retain_freed_memory()  # large tensors reuse freed memory: no page faults
        return int(args.func(args) or 0)
    except LenskitError as err:
        print(f"lenskit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lenskit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
