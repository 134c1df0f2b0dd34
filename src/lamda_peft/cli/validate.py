"""Checks on option values alone, shared by ``lamda-peft train`` and ``eval``: each raises ``UsageError`` with one
line naming the flag, the value and the fix (exit code 2).

They run before any data, model or output folder is touched. argparse checks only types: ``--lr nan``,
``--epochs -1`` or ``--lora-alpha 0`` parse, and unchecked they failed deep in the Trainer after the model had
loaded, or trained an adapter that learned nothing. An option left out is ``None`` and gets its default later; a
value given is never replaced by a default.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from . import UsageError

SEED_MAX = 2**32 - 1  # numpy's seed range (transformers' set_seed seeds numpy too)


class Rule(NamedTuple):
    requirement: str  # what a valid value is, as the message says it
    accepts: Callable[[float], bool]  # NaN fails every comparison, so it is refused by every rule


POSITIVE = Rule("a positive finite number", lambda v: 0 < v < math.inf)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: 0 <= v < math.inf)
FRACTION = Rule("a fraction in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION_BELOW_ONE = Rule("a fraction in [0, 1)", lambda v: 0 <= v < 1)
COUNT = Rule("a positive integer", lambda v: v >= 1)
COUNT_OR_ZERO = Rule("0 or a positive integer", lambda v: v >= 0)
PERCENTAGE = Rule("a percentage in (0, 100)", lambda v: 0 < v < 100)
SEED = Rule(f"an integer in [0, {SEED_MAX}]", lambda v: 0 <= v <= SEED_MAX)

# option -> (rule, fix). The fix says what to pass instead, or what leaving the option out gives.
SHARED_OPTIONS: dict[str, tuple[Rule, str]] = {
    "batch_size": (COUNT, "examples per forward pass, e.g. --batch-size 16 (the default)"),
    "max_length": (COUNT, "tokens per example, e.g. --max-length 128"),
    "num_generate": (COUNT_OR_ZERO, "the number of validation rows to answer (0: none)"),
    "max_new_tokens": (COUNT, "the longest answer in tokens, e.g. --max-new-tokens 256 (the default)"),
    "max_eval_samples": (COUNT, "the number of validation rows to use; leave it out for all"),
}
TRAIN_OPTIONS: dict[str, tuple[Rule, str]] = {
    **SHARED_OPTIONS,
    "lr": (POSITIVE, "pass e.g. --lr 1e-3, or leave --lr out for the default (1e-3 for adapters, 5e-5 for full)"),
    "lr_S": (POSITIVE, "pass e.g. --lr-S 5e-3, or leave it out to derive it from --lr"),
    "lr_B": (POSITIVE, "pass e.g. --lr-B 1e-3, or leave it out to use --lr"),
    "lr_head": (POSITIVE, "pass e.g. --lr-head 1e-3, or leave it out to use --lr"),
    "lora_alpha": (POSITIVE, "the adapter's output is scaled by alpha / r, so 0 trains an adapter that does nothing; "
                             "pass e.g. --lora-alpha 16, or leave it out for 2 r"),
    "epochs": (POSITIVE, "pass e.g. --epochs 1 (0.5 for half an epoch), or --max-steps N"),
    "freeze_ratio": (FRACTION, "the fraction of the steps over which B freezes (0: frozen from the start, 1: over the "
                               "whole run); leave it out for 0.3"),
    "warmup_ratio": (FRACTION_BELOW_ONE, "the fraction of the steps spent warming up to --lr (0: no warmup); leave "
                                         "it out for 0.06"),
    "weight_decay": (NON_NEGATIVE, "AdamW's decoupled weight decay, e.g. 0.01; leave it out for 0"),
    "r": (COUNT, "the adapter rank, e.g. --r 8 (the default)"),
    "max_steps": (COUNT, "pass e.g. --max-steps 100, or --epochs N"),
    "gradient_accumulation_steps": (COUNT, "forward passes per optimizer step, e.g. 1 (the default)"),
    "save_steps": (COUNT, "optimizer steps between checkpoints; leave it out for no checkpoints"),
    "logging_steps": (COUNT, "optimizer steps between log lines; leave it out for 50 per run"),
    "eval_steps": (COUNT_OR_ZERO, "0 evaluates only at the end; leave it out for 4 evaluations per run"),
    "seed": (SEED, "e.g. --seed 0 (the default)"),
    "max_train_samples": (COUNT, "the number of training rows to use; leave it out for all"),
    "lora_dropout": (FRACTION_BELOW_ONE, "the fraction of x A^T's entries dropped in training (0: none, the default)"),
    "warmup_steps": (COUNT_OR_ZERO, "optimizer steps of warmup (0: none); or --warmup-ratio"),
    "max_grad_norm": (NON_NEGATIVE, "the largest gradient norm before a step (0: no clipping); leave it out for 1"),
    "validation_split_percentage": (PERCENTAGE, "the percentage of the training rows held out, e.g. 10 (the "
                                                "default); or pass --validation-file"),
    "save_total_limit": (COUNT, "how many checkpoints to keep, e.g. --save-total-limit 2; leave it out for 1"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: float) -> str:
    """As the user would type it: 0 rather than 0.0, 1e-05, nan, inf."""
    return f"{value:.15g}" if isinstance(value, float) else str(value)


def check_values(args: argparse.Namespace, rules: Mapping[str, tuple[Rule, str]]) -> None:
    """Every numeric option that was given against its rule (the first one broken is reported)."""
    for name, (rule, fix) in rules.items():
        value = getattr(args, name, None)
        if value is not None and not rule.accepts(value):
            raise UsageError(f"{flag(name)} must be {rule.requirement}, got {shown(value)}; {fix}")


def check_not_empty(args: argparse.Namespace) -> None:
    """An empty string (``--model ""``) is a mistake, never a request for the default."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise UsageError(f"{flag(name)} is empty; give a value, or leave {flag(name)} out for its default")


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (or cannot be looked into: ``os.path.exists`` is False then)."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if os.path.exists(p))


def _writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_folder(option: str, out: Path) -> None:
    """``out`` will be created with its parents, written into and replaced by a rename in its parent folder: it must
    name a folder, be one if it exists, and the folder that will hold it must be writable."""
    if out.name in ("", ".."):
        raise UsageError(f"{option} {str(out)!r} does not name a new folder; pass a folder for the run, e.g. "
                         f"{option} runs/my-run")
    if os.path.exists(out):
        if not out.is_dir():
            raise UsageError(f"{option} {out} is a file; choose a folder name")
        if not _writable_folder(out):
            raise UsageError(f"{option} {out}: cannot write in that folder (permission denied); choose a folder you "
                             "can write to")
    _check_parent_writable(option, out)


def check_output_file(option: str, out: Path) -> None:
    """``out`` will be written (its missing parent folders created): it must not be a folder, and the folder that
    will hold it must be writable."""
    if os.path.isdir(out):
        raise UsageError(f"{option} {out} is a folder; give a file name, e.g. {option} {out / 'metrics.json'}")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise UsageError(f"{option} {out}: cannot write that file (permission denied); choose another file")
    _check_parent_writable(option, out)


def _check_parent_writable(option: str, out: Path) -> None:
    holder = nearest_existing(out.absolute().parent)
    if not holder.is_dir():
        raise UsageError(f"{option} {out}: {holder} is a file, not a folder; choose a path under a folder")
    if not _writable_folder(holder):
        raise UsageError(f"{option} {out}: cannot write in {holder} (permission denied); choose a folder you can "
                         "write to")


def check_train_options(args: argparse.Namespace, default_output: Path) -> None:
    """The option checks of ``train`` that need no data: values, then the output folder (``default_output`` stands
    for the default one, whose name needs the data)."""
    check_not_empty(args)
    check_values(args, TRAIN_OPTIONS)
    if args.output_dir is not None:
        check_output_folder("--output-dir", Path(args.output_dir))
    else:
        check_output_folder("--output-dir (default)", default_output)


def check_eval_options(args: argparse.Namespace) -> None:
    check_not_empty(args)
    check_values(args, SHARED_OPTIONS)
    if args.output is not None:
        check_output_file("--output", Path(args.output))
