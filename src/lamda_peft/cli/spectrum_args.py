"""The options of ``lamda-peft spectrum`` and their check (at once, before torch, transformers and peft are imported;
the command itself is ``spectrum``)."""

from __future__ import annotations

import argparse

from . import Command, UsageError

CSV_NAME, MD_NAME, PNG_NAME = "spectrum.csv", "spectrum.md", "spectrum.png"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "spectrum", help="energy scores E(r) and LaMDA++ ranks of every targeted module, with a plot",
        description="Decompose every targeted weight once and report E(r), the LaMDA++ rank and E at that rank; "
                    f"writes {CSV_NAME}, {MD_NAME} and {PNG_NAME} to --output-dir.",
    )
    p.add_argument("model", help="alias (minilm, smollm2), local folder or Hub id")
    p.add_argument("--rank", type=int, default=32, help="uniform rank r at which E(r) is read (default 32)")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear' (default, without the output head), comma-separated module names "
                        "(e.g. q_proj,v_proj) or a regex matching full module names")
    p.add_argument("--output-dir", default="spectrum", help="folder for the table and plot (default ./spectrum)")
    p.add_argument("--svd", choices=("exact", "randomized"), default="exact", help="decomposition (default exact)")
    p.add_argument("--r-min", type=int, help="LaMDA++ lower bound (default rank // 2)")
    p.add_argument("--r-max", type=int, help="LaMDA++ upper bound (default 2 * rank)")
    p.add_argument("--budget", type=int, help="LaMDA++ total rank (default rank x number of modules)")
    p.set_defaults(func=Command("lamda_peft.cli.spectrum:run", check=check_args))


def check_args(args: argparse.Namespace) -> None:
    if args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
