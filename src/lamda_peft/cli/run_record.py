"""What defines a ``lamda-peft train`` run and what its output folder records: the run's config (compared to decide
whether a folder holds "the same run"), the command that repeats it, the library versions, and the check that an
output folder may be written."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
from pathlib import Path
from typing import Any

import torch

from ..apps.data import DataSpec
from ..optim import given_lr_options
from . import UsageError
from .checkpoints import checkpoint_config, checkpoints, differing_options
from .eval import RUN_FILE  # its "config" says how to rebuild the model and read the data (``eval`` reads it)

LOGS = "logs"  # --report-to tensorboard writes here, in the output folder


def run_config(args: argparse.Namespace, spec: DataSpec, data_name: str) -> dict[str, Any]:
    """Everything that defines the run (compared to decide whether an output folder holds "the same run")."""
    return {
        "model": args.model, "method": args.method, "r": args.r, "lora_alpha": args.lora_alpha,
        "target_modules": args.target_modules, "freeze_ratio": args.freeze_ratio, "lr": args.lr,
        "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed,
        "dataset": data_name,
        "hub_dataset": str(Path(args.dataset).resolve()) if args.dataset and Path(args.dataset).exists() else args.dataset,
        "train_file": str(Path(args.train_file).resolve()) if args.train_file else None,
        "validation_file": str(Path(args.validation_file).resolve()) if args.validation_file else None,
        "no_header": args.no_header, **dataclasses.asdict(spec), **given_lr_options(args),
        **({"regression_bias": args.regression_bias} if args.regression_bias else {}),
        **({"init": args.init} if args.init else {}),
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio, "lr_scheduler": args.lr_scheduler, "bf16": args.bf16, "fp16": args.fp16,
        "dataset_config": args.dataset_config, "train_split": args.train_split if args.dataset else None,
        "validation_split": args.validation_split if args.dataset else None,
        **given_options(args),
    }


# Options added after runs were recorded: in the config only when given (or not at their default), so that an older
# run's folder still holds "the same run" as the command that wrote it.
OPTIONAL_OPTIONS = {"max_train_samples": None, "max_eval_samples": None, "lora_dropout": None, "warmup_steps": None,
                    "max_grad_norm": 1.0, "gradient_checkpointing": False,
                    "validation_split_percentage": None, "modules_to_save": None}


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name, default in OPTIONAL_OPTIONS.items()
            if getattr(args, name, default) != default}


def check_output_dir(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder that holds something other than this same run (finished, or its checkpoints), unless
    --overwrite; a different run is refused naming the options that differ."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; choose a folder name")
    if overwrite or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / RUN_FILE).read_text()).get("config")
    except (OSError, ValueError):
        found = checkpoints(out)  # an interrupted run: only its checkpoints (and logs)
        only_run_files = all(p in found or p.name == LOGS for p in out.iterdir())
        previous = checkpoint_config(found[-1]) if found and only_run_files else None
    if not isinstance(previous, dict):
        raise UsageError(f"--output-dir {out} already holds files that are not a 'lamda-peft train' run; pass "
                         "--overwrite to replace them, or another --output-dir")
    changed = differing_options(previous, config)
    if changed:  # the same run again is replaced (or resumed)
        raise UsageError(f"--output-dir {out} already holds a different run (options that differ: "
                         f"{', '.join(changed)}); pass --overwrite to replace it, or another --output-dir")


def versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {"lamda_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "machine": platform.platform()}


def command_line(args: argparse.Namespace) -> str:
    """An explicit command that repeats this run (every option spelled out, defaults resolved)."""
    words = ["lamda-peft", "train"]
    for key, value in vars(args).items():
        if key in ("func", "command", "resume_from_checkpoint") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return shlex.join(words)
