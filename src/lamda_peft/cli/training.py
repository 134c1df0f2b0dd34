"""The training loop of ``lamda-peft train`` (and of the accuracy benchmarks): the transformers ``Trainer`` with
the options a fine-tuning command is expected to have, ``LamdaCallback`` for LaMDA, and the run's accounting.

``args`` is the parsed command line; the benchmarks pass a ``SimpleNamespace`` with only ``batch_size``, ``lr``,
``epochs``, ``max_steps``, ``seed``, ``eval_steps`` and ``method``, so every later option has a default here.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..optim import trainer_optimizers
from ..tuners.quantized import quantization_state_bytes
from . import UsageError
from .train_args import LR_SCHEDULERS, REPORTERS, check_reporters  # noqa: F401 (their home before)
from .trainer import CliTrainer, NothingLeftToTrain, NumericProgress, SkipFinalEvaluation  # noqa: F401 (API)

DEFAULTS = {"gradient_accumulation_steps": 1, "weight_decay": 0.0, "warmup_ratio": 0.06, "lr_scheduler": "linear",
            "bf16": False, "fp16": False, "save_steps": None, "report_to": ["none"], "logging_steps": None,
            "warmup_steps": None, "max_grad_norm": 1.0, "gradient_checkpointing": False}


def option(args: Any, name: str) -> Any:
    return getattr(args, name, DEFAULTS[name])


def epochs(args: Any) -> float:
    """--epochs, 1 when not given (None; the CLI refuses 0)."""
    return 1 if args.epochs is None else args.epochs


def total_steps(train_rows: int, args: Any) -> int:
    """Optimizer steps of the run: --max-steps, or epochs * ceil(batches per epoch / gradient accumulation)."""
    if args.max_steps is not None:
        return args.max_steps
    batches = math.ceil(train_rows / args.batch_size)
    per_epoch = max(1, math.ceil(batches / option(args, "gradient_accumulation_steps")))
    return max(1, math.ceil(per_epoch * epochs(args)))


def warmup_steps(args: Any, total: int) -> int:
    """--warmup-steps, or --warmup-ratio of the run's steps (rounded down)."""
    if option(args, "warmup_steps") is not None:
        return option(args, "warmup_steps")
    ratio = option(args, "warmup_ratio")
    return int((DEFAULTS["warmup_ratio"] if ratio is None else ratio) * total)


def eval_every(args: Any, total: int) -> int:
    """--eval-steps, or 4 evaluations per run (every ceil(T / 4) steps: T = 5 gives steps 2 and 4, not all 5).
    --eval-steps 0 (only the final evaluation) gets the default too: the caller then passes no evaluation set, so no
    periodic evaluation runs and the interval is unused."""
    if args.eval_steps is None or args.eval_steps == 0:
        return max(1, math.ceil(total / 4))
    return args.eval_steps


def lamda_callbacks(method: str) -> list:
    if method not in ("lamda", "lamda++"):
        return []
    try:
        from .. import LamdaCallback
    except ImportError:
        print("warning: lamda_peft.LamdaCallback is not available; B is not frozen during this run", file=sys.stderr)
        return []
    return [LamdaCallback()]


def reporting_callbacks(report_to: Sequence[str], logging_dir: Optional[Path]) -> tuple[list, list[str]]:
    """(callbacks, report_to for TrainingArguments): TensorBoard writes to ``logging_dir``; wandb is the Trainer's."""
    callbacks: list = []
    if "tensorboard" in report_to and logging_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(logging_dir))))
    return callbacks, [r for r in report_to if r == "wandb"] or ["none"]


def train_model(model, tokenizer, spec, train_ds, eval_ds, args: argparse.Namespace | Any, workdir: Path,
                callbacks: Sequence = (), resume: Optional[Path] = None, logging_dir: Optional[Path] = None):
    """Run the Trainer; returns it (its ``state.log_history`` holds the losses and, for LaMDA, the frozen columns).

    ``eval_ds`` is evaluated every ``eval_every`` steps but not at the last one: the caller evaluates the trained model
    (``evaluate``, every task metric) and may add it with ``log_final_evaluation``. Checkpoints (--save-steps) are
    written under ``workdir``; ``callbacks`` may move them elsewhere on save. A ``resume`` from a checkpoint at the
    run's last step trains nothing (and says so).
    """
    from transformers import TrainingArguments

    from .eval import collator_for

    total = total_steps(len(train_ds), args)
    save_steps, logging_steps = option(args, "save_steps"), option(args, "logging_steps")
    extra, report_to = reporting_callbacks(option(args, "report_to"), logging_dir)
    training_args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
        gradient_accumulation_steps=option(args, "gradient_accumulation_steps"),
        num_train_epochs=epochs(args), max_steps=-1 if args.max_steps is None else args.max_steps,
        warmup_steps=warmup_steps(args, total), lr_scheduler_type=option(args, "lr_scheduler"),
        max_grad_norm=option(args, "max_grad_norm"), weight_decay=option(args, "weight_decay"),
        # non-reentrant: needs no input that requires a gradient (the base is frozen under an adapter)
        activation_checkpointing=option(args, "gradient_checkpointing"),
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=option(args, "bf16"), fp16=option(args, "fp16"),
        logging_steps=logging_steps if logging_steps is not None else max(1, total // 50),
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=eval_every(args, total),
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,  # None or 0: no checkpoints
        restore_callback_states_from_checkpoint=resume is not None,
        report_to=report_to, seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = CliTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=collator_for(spec, tokenizer), task=spec.task,
                         callbacks=[*lamda_callbacks(args.method), *extra, *callbacks, SkipFinalEvaluation()],
                         optimizers=trainer_optimizers(model, args))
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NothingLeftToTrain:
        print(f"{resume} is at step {trainer.state.global_step} of {trainer.state.max_steps}: nothing left to train; "
              "evaluating it")
    finally:
        if trainer.progress() is not None:  # closed now (Ctrl-C, early stop), so the command's last line is its own
            trainer.progress().close()
    return trainer


def log_final_evaluation(trainer, result: dict[str, Any]) -> None:
    """Record the caller's final evaluation in the log history (for the plot and metrics.json) where the Trainer's own
    would have been: ``eval_loss`` and the other numbers, at the last step."""
    figures = {k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    entry = {**figures, "epoch": trainer.state.epoch, "step": trainer.state.global_step}
    trainer.state.log_history.append({k: v for k, v in entry.items() if v is not None})


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def accounted_memory(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of parameters, of gradients of the trainable ones and of the optimizer state (no activations)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters()) + quantization_state_bytes(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return {"parameters": params, "gradients": grads, "optimizer_state": state, "total": params + grads + state}


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
