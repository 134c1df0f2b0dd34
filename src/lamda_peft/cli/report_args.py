"""The options of ``lamda-peft report`` and their checks (at once, before torch, transformers and peft are imported;
the command itself is ``report``)."""

from __future__ import annotations

import argparse

from . import Command, UsageError

SHIPPED = ("llama-2-7b", "deberta-v3-base", "bart-large")
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the keys of report.DTYPES, sorted

HELP = """Plan the memory of a fine-tuning run before starting it (no weights are loaded).

    lamda-peft report llama-2-7b --r 64 --batch 8 --seq 1024 --dtype bf16

MODEL_OR_CONFIG is a shipped config name (llama-2-7b, deberta-v3-base, bart-large), a model alias (minilm,
smollm2), a config.json, a local model folder or a Hub id; the architecture is built on the meta device. One row per
method: trainable parameters at the start and the end of the run, parameter updates averaged over the run (LaMDA's
B frozen column by column over the first --freeze-ratio of --steps), gradient and AdamW state bytes, adapter
activation bytes, the frozen model's own saved activations, the accounted total and its ratio to LoRA."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="estimate the training memory of each method (no weights loaded)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help=f"{', '.join(SHIPPED)}, minilm, smollm2, a config.json, a folder or a Hub id")
    p.add_argument("--r", type=int, default=64, help="adapter rank (default 64)")
    p.add_argument("--batch", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per example (default 1024)")
    p.add_argument("--targets", default="all-linear", help="'all-linear' (default) or comma-separated module names")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16",
                   help="base weights' dtype (default bf16; adapters are fp32)")
    p.add_argument("--steps", type=int, default=1000, help="training steps, for the averaged updates (default 1000)")
    p.add_argument("--freeze-ratio", type=float, default=0.3,
                   help="LaMDA's B is frozen over this fraction of the steps (default 0.3)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the run would train (default cuda)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="the base's linear layers in 4-bit NF4, as `lamda-peft train --load-in-4bit` loads them "
                        "(--dtype is then the compute dtype)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=Command("lamda_peft.cli.report:run", check=check_args))


def check_args(args: argparse.Namespace) -> None:
    for name in ("r", "batch", "seq", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0 <= args.freeze_ratio <= 1:
        raise UsageError(f"--freeze-ratio must be in [0, 1], got {args.freeze_ratio}")
