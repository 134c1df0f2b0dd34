"""The options of ``lamda-peft eval`` and the checks that need no adapter, data or model (exit code 2 at once,
before torch, transformers and peft are imported; ``eval.run`` repeats them for callers that skip ``main``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from . import Command, UsageError
from .validate import check_eval_options, check_output_file

RUN_FILE = "metrics.json"  # written by train: its "config" says how to rebuild the model and read the data
FORMATS = (".jsonl", ".csv")


def check_predictions_file(path: Optional[str]) -> None:
    """Up front, like --output: a writable file whose extension says the format."""
    if path is None:
        return
    check_output_file("--predictions", Path(path))
    if Path(path).suffix.lower() not in FORMATS:
        raise UsageError(f"--predictions {path}: the extension says the format; give a .jsonl or .csv file name, "
                         f"e.g. --predictions {Path(path).with_suffix('.jsonl')}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a trained adapter on a data file",
        description="Load an adapter written by 'lamda-peft train' (or any PEFT adapter, with --model and --task) "
                    "and report the task metrics on --validation-file.",
    )
    p.add_argument("--adapter", required=True, help="folder written by 'lamda-peft train' (or a PEFT adapter)")
    p.add_argument("--validation-file", help="csv, tsv, json, jsonl or parquet (default: the run's own validation data)")
    p.add_argument("--model", help="base model (alias, folder or Hub id; default: the one the run used)")
    p.add_argument("--task", help="classification, regression or causal-lm (default: the run's task)")
    p.add_argument("--text-column", nargs="+", help="text column(s) (default: the run's)")
    p.add_argument("--label-column", help="label column (default: the run's)")
    p.add_argument("--prompt-column", help="causal-lm prompt column (default: the run's)")
    p.add_argument("--response-column", help="causal-lm response column (default: the run's)")
    p.add_argument("--no-header", action="store_true", help="the csv/tsv file has no header row (columns 0, 1, ...)")
    p.add_argument("--max-eval-samples", type=int, help="evaluate on the first N rows only (default: all; the run's "
                                                        "own limit on its own validation data)")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the run's)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default 16)")
    p.add_argument("--num-generate", type=int, default=8, help="causal-lm: greedy answers for the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=256, help="causal-lm: generation length limit")
    either = p.add_mutually_exclusive_group()
    either.add_argument("--load-in-4bit", action="store_true",
                        help="load the base in 4-bit NF4 (bitsandbytes), as 'train --load-in-4bit' did (default: as "
                             "the run was trained, from its metrics.json)")
    either.add_argument("--load-in-8bit", action="store_true",
                        help="load the base in 8-bit (bitsandbytes' LLM.int8), as 'train --load-in-8bit' did")
    p.add_argument("--output", help="also write the metrics as JSON to this file (its folder is created)")
    p.add_argument("--predictions", help="also write one row per validation example (text, label, prediction) to this "
                                         ".jsonl or .csv file")
    p.set_defaults(func=Command("lamda_peft.cli.eval:run", check=check_args))


def check_args(args: argparse.Namespace) -> None:
    """The options alone: their values, then the --output and --predictions files."""
    check_eval_options(args)
    check_predictions_file(args.predictions)
