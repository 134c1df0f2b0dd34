"""The ``lamda-peft`` command line: one module per subcommand.

Each subcommand has a light module that defines ``add_parser(subparsers)`` (its options and ``func``) and the checks
on its options alone (``PARSERS``); ``func`` is a ``Command``, which runs those checks and only then imports the
subcommand's module, ``lamda_peft.cli.<name>`` (torch, transformers, peft: seconds). So ``--help``, an option error and
a Ctrl-C come at once. A user error raises ``UsageError`` and exits with code 2 and a one-line message, never a
traceback; Ctrl-C exits with code 130 and one line (a subcommand may raise ``Interrupted``, a ``KeyboardInterrupt``,
with a message saying what was kept).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Optional, Sequence

SUBCOMMANDS = ("train", "eval", "spectrum", "report", "export")  # export.py adds export and merge
#: subcommand -> the light module with its ``add_parser`` (nothing heavy imported; tests/test_lazy_import.py)
PARSERS = {"train": "train_args", "eval": "eval_args", "spectrum": "spectrum_args", "report": "report_args",
           "export": "export"}


class UsageError(Exception):
    """Bad input from the user: printed as ``lamda-peft: error: <message>``, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message naming what was kept: printed as ``lamda-peft: <message>``, exit code 130."""


class Command:
    """A subcommand's ``func``: ``check(args)`` (the options alone), then ``module:function`` imported and called.

    The heavy import comes after the checks, so an option error is one line at once; ``main`` has installed the
    Ctrl-C handler before."""

    def __init__(self, target: str, check: Optional[Callable[[argparse.Namespace], Any]] = None) -> None:
        self.target, self.check = target, check

    def __call__(self, args: argparse.Namespace) -> Any:
        if self.check is not None:
            self.check(args)
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(args)

    def __repr__(self) -> str:
        return f"Command({self.target!r})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamda-peft", description="LaMDA, LaMDA++ and LoRA-FA fine-tuning tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lamda_peft.cli.{PARSERS[name]}").add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .interrupts import sigint_handled  # imports nothing heavy: the handler is in place before transformers is

    try:
        with sigint_handled():
            parser = build_parser()  # light: the subcommands' options only
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            return int(args.func(args) or 0)  # a Command: the option checks, then the heavy import and the run
    except UsageError as err:
        print(f"lamda-peft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the shell's code for SIGINT (128 + 2)
        print(f"\nlamda-peft: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
