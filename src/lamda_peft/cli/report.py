"""``lamda-peft report``: plan the memory of a fine-tuning run before starting it, no weights loaded (``HELP``, the
command's ``--help``, says what it prints)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from . import UsageError
from .report_args import HELP, SHIPPED, check_args  # noqa: F401 (HELP: its home before)
from .report_args import add_parser as _add_parser
from ..memory import (
    MB,
    adapter_trainable_parameters,
    estimate_training_step,
    lamda_average_updates,
    prepare_model,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # report_args.DTYPE_NAMES
#: (row label, method of the estimate); LaMDA++ keeps the uniform rank budget (see ``lamda_plus_plus_note``)
ROWS = (("LoRA", "lora"), ("LoRA-FA", "lorafa"), ("LaMDA, B training", "lamda"),
        ("LaMDA, B frozen", "lamda_frozen"), ("LaMDA++ (uniform ranks)", "lamda"))
LAMDA_PLUS_PLUS_NOTE = ("LaMDA++ moves rank between modules under the same total rank budget, so its adapter "
                        "activations (n x the rank sum) equal LaMDA's; its per-module ranks need the weights' singular "
                        "values (lamda-peft spectrum), so this row uses uniform ranks. With the allocated ranks the "
                        "S parameters (sum of r_l^2) can only grow and B's (sum of r_l d_out) move with the d_out of "
                        "the modules that gain rank.")


@dataclass
class Row:
    method: str
    start: int
    end: int
    average_updates: float
    gradient_bytes: int
    optimizer_bytes: int
    adapter_activation_bytes: int
    model_activation_bytes: Optional[int]  # None: the architecture has no formula and cannot be traced on meta
    accounted_bytes: int
    ratio_to_lora: float = 1.0


def load_config(name_or_path: str):
    """A transformers config from a shipped name, a config.json, a model alias (as ``train`` takes it), a model
    folder or a Hub id."""
    from transformers import AutoConfig

    from ..apps.models import ALIASES
    from .model_path import resolve_model_path

    if name_or_path in SHIPPED:
        with resources.as_file(resources.files("lamda_peft") / "configs" / f"{name_or_path}.json") as path:
            return AutoConfig.from_pretrained(str(path))
    path = Path(name_or_path)
    if path.is_file() and path.suffix != ".json":
        raise UsageError(f"{name_or_path} is a file but not a config.json; pass a config.json or a model folder")
    if name_or_path in ALIASES:  # the same resolver as train, eval and spectrum (one place for the aliases)
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path, option="MODEL_OR_CONFIG"))
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot read a model config from {name_or_path!r} ({str(err).splitlines()[0]}); pass a shipped name "
            f"({', '.join(SHIPPED)}), an alias ({', '.join(ALIASES)}), a config.json, a local model folder, or a "
            "Hub id reachable from this machine"
        ) from None


def plan(config, r: int, batch: int, seq: int, targets, dtype: torch.dtype, steps: int = 1000,
         freeze_ratio: float = 0.3, device: str = "cuda", load_in_4bit: bool = False) -> list[Row]:
    """The report's rows (see the module docstring)."""
    prepared = prepare_model(config, batch, seq, r, targets, dtype, load_in_4bit=load_in_4bit)
    modules = prepared.modules
    rows = []
    for label, method in ROWS:
        report = estimate_training_step(config, batch, seq, method=method, r=r, targets=targets, dtype=dtype,
                                        device=device, prepared=prepared)
        extra = report.trainable_parameters - sum(adapter_trainable_parameters(method, m.d_in, m.d_out, m.r)
                                                  for m in modules)  # e.g. a classification head
        start = sum(adapter_trainable_parameters(method, m.d_in, m.d_out, m.r) for m in modules) + extra
        if method == "lamda":
            end = sum(adapter_trainable_parameters("lamda_frozen", m.d_in, m.d_out, m.r) for m in modules) + extra
            average = sum(lamda_average_updates(m.d_out, m.r, freeze_ratio, steps) for m in modules) + extra
        else:
            end, average = start, float(start)
        rows.append(Row(label, start, end, average, report.gradient_bytes, report.optimizer_state_bytes,
                        report.adapter_saved_bytes, report.details["model_saved_bytes"], report.accounted_bytes))
    for row in rows:
        row.ratio_to_lora = row.accounted_bytes / rows[0].accounted_bytes
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("| method | trainable start | trainable end | avg updates | grad MB | AdamW MB | adapter act. MB "
            "| model act. MB | total MB | vs LoRA | LoRA updates / these |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    lora_updates = rows[0].average_updates
    for row in rows:
        lines.append(
            f"| {row.method} | {row.start:,} | {row.end:,} | {row.average_updates:,.0f} | {row.gradient_bytes / MB:,.1f} "
            f"| {row.optimizer_bytes / MB:,.1f} | {row.adapter_activation_bytes / MB:,.1f} "
            f"| {_mb(row.model_activation_bytes)} | {row.accounted_bytes / MB:,.1f} | {row.ratio_to_lora:.3f} "
            f"| {lora_updates / row.average_updates:.1f}x |"
        )
    return "\n".join(lines)


def _mb(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / MB:,.1f}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``report`` subcommand (its options and checks are in ``report_args``, which ``lamda-peft`` imports)."""
    _add_parser(subparsers)


def run(args) -> int:
    check_args(args)
    config = load_config(args.model)
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        rows = plan(config, args.r, args.batch, args.seq, targets, DTYPES[args.dtype], args.steps, args.freeze_ratio,
                    args.device, load_in_4bit=args.load_in_4bit)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    base = f"4-bit NF4 base (compute {args.dtype})" if args.load_in_4bit else f"base {args.dtype}"
    print(f"{args.model}: r={args.r}, batch {args.batch} x seq {args.seq}, targets {args.targets}, {base}, "
          f"AdamW, {args.steps} steps (B frozen over the first {args.freeze_ratio:.0%}); MB = 10^6 bytes\n")
    print(format_table(rows))
    if rows[0].model_activation_bytes is None:
        print("\nThe frozen model's own activations: n/a (no formula for this architecture, and its forward reads "
              "data, so it cannot be traced on the meta device); the totals leave them out.")
    print(f"\nLaMDA++: {LAMDA_PLUS_PLUS_NOTE}")
    return 0
