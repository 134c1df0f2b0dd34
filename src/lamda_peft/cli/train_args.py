"""The options of ``lamda-peft train`` and the checks that need no data or model (exit code 2 before any work)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .._options import check_lr_options
from . import Command, UsageError, quantized_base
from .arguments import add_lr_arguments, add_regression_bias_argument
from .validate import check_train_options

METHODS = ("lamda", "lamda++", "lora-fa", "lora", "full")
INITS = ("gradient", "spectral", "activations")
# LaMDA's defaults on the command line: the gradient init with B's window at 70% of the steps beat the paper's spectral
# init (B over 30%) on every seed of the GLUE benchmark (docs/results/glue.md); `--init spectral` is the paper's.
DEFAULT_INIT = "gradient"
PAPER_FREEZE_RATIO = 0.3  # LamdaConfig's default; the command line keeps it for the other inits
DEFAULT_FREEZE_RATIO = {"gradient": 0.7}
DEFAULT_LR = {"full": 5e-5}  # adapters: 1e-3
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
REPORTERS = ("none", "tensorboard", "wandb")


def check_reporters(report_to: Sequence[str]) -> list[str]:
    """The integrations to log to; an uninstalled one is a usage error naming the package."""
    chosen = [r for r in report_to if r != "none"]
    for name in chosen:
        if name not in REPORTERS:
            raise UsageError(f"--report-to {name!r}: choose from {', '.join(REPORTERS)}")
        if importlib.util.find_spec(name) is None:
            extra = ' (pip install "lamda-peft[tensorboard]")' if name == "tensorboard" else ""
            raise UsageError(f"--report-to {name} needs the {name} package: pip install {name}{extra}")
    return chosen


def add_parser(subparsers: argparse._SubParsersAction,
               run: Optional[Callable[[argparse.Namespace], Any]] = None) -> argparse.ArgumentParser:
    """The ``train`` subcommand; ``run`` defaults to ``lamda_peft.cli.train.run``, imported after ``check_args``
    passed (the options alone decide an option error, before torch, transformers and peft are imported)."""
    p = subparsers.add_parser(
        "train", help="fine-tune a model (no arguments: the MiniLM + BBC News demo)",
        description="Fine-tune with LaMDA (default), LaMDA++, LoRA-FA, PEFT LoRA or full fine-tuning. "
                    "Writes the adapter, metrics.json and loss_curve.png to --output-dir.",
    )
    d = p.add_argument_group("data (default: the BBC News demo)")
    d.add_argument("--train-file", help="csv, tsv, json, jsonl or parquet")
    d.add_argument("--validation-file", help="csv, tsv, json, jsonl or parquet; metrics are computed on it")
    d.add_argument("--validation-split-percentage", type=float,
                   help="without --validation-file: the percentage of the training rows held out for validation, "
                        "seeded with --seed (default 10)")
    d.add_argument("--dataset", help="a data set on the Hub (or a local data set folder), read with datasets")
    d.add_argument("--dataset-config", help="--dataset: its configuration (e.g. sst2 for nyu-mll/glue)")
    d.add_argument("--train-split", default="train", help="--dataset: training split (default train)")
    d.add_argument("--validation-split", default="validation", help="--dataset: validation split (default validation)")
    d.add_argument("--no-header", action="store_true", help="csv/tsv without a header row: columns are 0, 1, ...")
    d.add_argument("--max-train-samples", type=int, help="train on the first N training rows only (default: all)")
    d.add_argument("--max-eval-samples", type=int, help="evaluate on the first N validation rows only (default: all)")
    d.add_argument("--text-column", nargs="+", help="one text column, or two for sentence pairs (name or index)")
    d.add_argument("--label-column", help="label column (default: 'label', 'labels' or 'score')")
    d.add_argument("--task", help="classification, regression or causal-lm (default: inferred from the data)")
    d.add_argument("--prompt-column", help="causal-lm: prompt column (default: 'prompt', 'question', 'instruction' "
                                           "or 'input')")
    d.add_argument("--response-column", help="causal-lm: response column, the only tokens in the loss (default: "
                                             "'response', 'answer', 'output' or 'completion')")
    add_regression_bias_argument(d)  # lamda_peft.heads
    m = p.add_argument_group("model and method")
    m.add_argument("--model", default="minilm", help="alias (minilm, smollm2), local folder or Hub id")
    m.add_argument("--method", default="lamda", help=f"one of {', '.join(METHODS)} (default lamda)")
    m.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    m.add_argument("--lora-alpha", type=float, help="scaling numerator, s = alpha / r (default 2 r)")
    m.add_argument("--target-modules", nargs="+", default=["all-linear"], help="module names or 'all-linear'")
    m.add_argument("--modules-to-save", nargs="+", metavar="MODULE",
                   help="modules trained in full and saved with the adapter (PEFT's modules_to_save; names, space- or "
                        "comma-separated; the classification head always is); not for full")
    m.add_argument("--lora-dropout", type=float, help="dropout on the adapter's r-dimensional x A^T, in [0, 1) "
                                                      "(default 0; not for full)")
    m.add_argument("--freeze-ratio", type=float, help="LaMDA: fraction of steps over which B freezes (default 0.7 "
                                                      "with the gradient init, the paper's 0.3 with the others)")
    m.add_argument("--init", choices=INITS,
                   help="LaMDA: A and B0 from the top-r singular subspaces of the training loss's gradient (gradient; "
                        "default), from the weight's top-r SVD (spectral, the paper's), or A from the top-r principal "
                        "directions of each layer's inputs (activations); gradient and activations over 8 training "
                        "batches")
    quantized_base.add_argument(m)
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adapters, 5e-5 for full)")
    add_lr_arguments(t)  # --lr-S, --lr-B, --lr-head (lamda_peft.optim's groups)
    t.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default 16)")
    t.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="forward passes per optimizer step: the effective batch is batch-size * this (default 1)")
    t.add_argument("--max-length", type=int, default=128, help="tokens per example; longer ones are truncated "
                                                               "(default 128)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    t.add_argument("--warmup-ratio", type=float, help="fraction of steps of linear warmup (default 0.06)")
    t.add_argument("--warmup-steps", type=int, help="optimizer steps of linear warmup (instead of --warmup-ratio)")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward instead of keeping them (less memory, about "
                        "a third more compute; the Trainer's non-reentrant checkpointing)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient's norm to this before each "
                                                                    "step; 0: no clipping (default 1, the Trainer's)")
    t.add_argument("--lr-scheduler", default="linear", choices=LR_SCHEDULERS, help="learning-rate schedule after "
                                                                                     "warmup (default linear decay)")
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bfloat16: the frozen base weights in bf16 and bf16 "
                                                          "autocast; trainable factors stay float32")
    prec.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (GPU); trainable "
                                                          "factors stay float32")
    t.add_argument("--seed", type=int, default=0, help="seed of the adapter init, data order and dropout (default 0)")
    o = p.add_argument_group("evaluation, logging and checkpoints")
    o.add_argument("--eval-steps", type=int, help="validation loss every N optimizer steps, for the plot (default: "
                                                  "4 times per run; 0: only at the end)")
    o.add_argument("--logging-steps", type=int, help="train loss logged every N steps (default: 50 times per run)")
    o.add_argument("--report-to", nargs="+", default=["none"], choices=REPORTERS,
                   help="also log to tensorboard (in OUTPUT_DIR/logs) or wandb (default none)")
    o.add_argument("--save-steps", type=int, help="write a checkpoint to OUTPUT_DIR/checkpoint-N every N steps "
                                                  "(the last one is kept)")
    o.add_argument("--save-total-limit", type=int, help="--save-steps: how many of the newest checkpoints the "
                                                        "output folder keeps (default 1)")
    o.add_argument("--resume-from-checkpoint", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint-N folder (no value: the newest one in --output-dir)")
    o.add_argument("--num-generate", type=int, default=0, help="causal-lm: greedy answers for N validation rows")
    o.add_argument("--max-new-tokens", type=int, default=256, help="causal-lm: generation length limit")
    o.add_argument("--output-dir", help="default runs/<method>-<model>-<data>")
    o.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")
    p.set_defaults(func=run if run is not None else Command("lamda_peft.cli.train:run", check=check_args))
    return p


def default_output_dir(args: argparse.Namespace, data_name: str) -> Path:
    """``runs/<method>-<model>-<data>``: where a run goes without --output-dir."""
    return Path("runs") / f"{args.method.replace('+', 'p')}-{Path(args.model).name}-{data_name}"


def check_args(args: argparse.Namespace) -> None:
    """Every check on the options alone, before any data or model is read; then the defaults that depend on other
    options, for the options left out (an explicit value, 0 included, is never replaced)."""
    if args.method not in METHODS:
        raise UsageError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    check_train_options(args, default_output=default_output_dir(args, "<data>"))
    if args.epochs is not None and args.max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    if args.dataset and (args.train_file or args.validation_file):
        raise UsageError("give --dataset or --train-file/--validation-file, not both")
    if args.validation_split_percentage is not None and (args.validation_file or not args.train_file):
        raise UsageError(f"--validation-split-percentage {args.validation_split_percentage:g} applies to --train-file "
                         "without --validation-file only; leave it out, or the --validation-file")
    if args.dataset_config and not args.dataset:
        raise UsageError("--dataset-config needs --dataset")
    if args.fp16:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--fp16 needs a GPU (float16 autocast with loss scaling); on the CPU use --bf16")
    check_schedule_options(args)
    lamda_only = [flag for flag, value in (("--freeze-ratio", args.freeze_ratio), ("--init", args.init))
                  if value is not None]
    if lamda_only and args.method not in ("lamda", "lamda++"):
        raise UsageError(f"{', '.join(lamda_only)} apply to --method lamda and lamda++ only (got --method {args.method})")
    try:
        check_lr_options(args)  # which methods take --lr-S, --lr-B, --lr-head (their values are checked above)
    except ValueError as err:
        raise UsageError(str(err)) from None
    quantized_base.check(args)
    args.report_to = check_reporters(args.report_to) or ["none"]
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.r
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.method, 1e-3)
    if args.warmup_ratio is None and args.warmup_steps is None:
        args.warmup_ratio = 0.06
    if args.method in ("lamda", "lamda++"):  # the defaults, as given values: the run record shows what trained
        args.init = args.init or DEFAULT_INIT
        if args.freeze_ratio is None:
            args.freeze_ratio = DEFAULT_FREEZE_RATIO.get(args.init, PAPER_FREEZE_RATIO)


def check_schedule_options(args: argparse.Namespace) -> None:
    """The options that only make sense with another one, or not with it (their values are checked before)."""
    if args.warmup_ratio is not None and args.warmup_steps is not None:
        raise UsageError("give --warmup-ratio or --warmup-steps, not both")
    if args.save_total_limit is not None and not args.save_steps:
        raise UsageError("--save-total-limit needs --save-steps N (it says how many of those checkpoints to keep)")
    if args.modules_to_save is not None:
        args.modules_to_save = [n.strip() for item in args.modules_to_save for n in item.split(",") if n.strip()]
        if not args.modules_to_save:
            raise UsageError("--modules-to-save names no module; give module names, e.g. --modules-to-save pooler")
        if args.method == "full":
            raise UsageError(f"--modules-to-save {','.join(args.modules_to_save)} applies to the adapter methods; "
                             "--method full trains every module already")
    if args.lora_dropout is not None and args.method == "full":
        raise UsageError("--lora-dropout applies to the adapter methods, not --method full")
