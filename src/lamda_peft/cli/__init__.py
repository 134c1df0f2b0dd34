"""The ``lamda-peft`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (registering its options and ``func``); a user error
raises ``UsageError`` and exits with code 2 and a one-line message, never a traceback; Ctrl-C exits with code 130 and
one line (a subcommand may raise ``Interrupted``, a ``KeyboardInterrupt``, with a message saying what was kept).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = ("train", "eval", "spectrum", "report", "export")  # export.py adds export and merge


class UsageError(Exception):
    """Bad input from the user: printed as ``lamda-peft: error: <message>``, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message naming what was kept: printed as ``lamda-peft: <message>``, exit code 130."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamda-peft", description="LaMDA, LaMDA++ and LoRA-FA fine-tuning tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"lamda_peft.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"lamda_peft.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .interrupts import sigint_handled  # imports nothing heavy: the handler is in place before transformers is

    try:
        with sigint_handled():
            parser = build_parser()  # imports the subcommands (transformers, ...): Ctrl-C may come here too
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            return int(args.func(args) or 0)
    except UsageError as err:
        print(f"lamda-peft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the shell's code for SIGINT (128 + 2)
        print(f"\nlamda-peft: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
