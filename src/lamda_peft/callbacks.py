"""LamdaCallback: the PMB freezing schedule for the transformers Trainer, with logging and resume.

    trainer = Trainer(model=peft_model, args=args, ..., callbacks=[lamda_peft.LamdaCallback()])

T is the Trainer's ``state.max_steps`` (it already folds in epochs, steps per epoch and gradient accumulation).
The hooks go on the Trainer's optimizer at ``on_train_begin``; from then on ``lamda_peft.freezing`` does the work
on every optimizer step. The logs get ``lamda_frozen_columns`` (over all modules) and ``lamda_frozen_fraction``.

Stall check: at the first log once B is fully frozen, the log gets ``lamda_loss_ratio`` (the mean logged loss over
the last third of the freezing window over that over its first third, ``lamda_peft.stall``), and the callback warns
when the loss fell less than ``stall_min_decrease``.

Resume: the callback is an ``ExportableState``, so the Trainer stores its state in ``trainer_state.json``. The
freezing step is ``global_step`` minus the optimizer steps a loss scaler skipped, and the columns frozen by then
are frozen at once from the checkpoint's B, whose frozen columns hold exactly their frozen values.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .freezing import PMBFreezer, Release, attach_freezing, check_release
from .stall import DEFAULT_MIN_DECREASE, check_min_decrease, loss_ratio, warn_if_stalled
from .tuners.base_layer import LowRankDeltaLayer


def restore_float32_factors(model: Any, fresh: bool) -> None:
    """Put trainable factors (S, B) back in float32 if a trainer cast them (TRL's SFTTrainer casts every trainable
    parameter to bf16 on a quantized base). The cast rounded B, so on a ``fresh`` run (no step taken) B0S0 is set to
    the rounded B S: the delta B S - B0S0 is exactly 0 again at step 0. Runs before the optimizer has state, on the
    same Parameter objects, so the optimizer keeps them."""
    cast = []
    for name, module in model.named_modules():
        if not isinstance(module, LowRankDeltaLayer):
            continue
        for container in module.adapter_layer_names:
            for adapter, param in getattr(module, container).items():
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                    cast.append(f"{name}.{container}.{adapter}")
        if cast and fresh and hasattr(module, "lamda_B0S0"):
            with torch.no_grad():
                for adapter in module.lamda_B0S0:
                    module.lamda_B0S0[adapter].copy_(module.lamda_B[adapter] @ module.lamda_S[adapter])
    if cast:
        warnings.warn(f"{len(cast)} trainable LaMDA/LoRA-FA factors were not float32 (e.g. {cast[0]}); restored to "
                      "float32 (lamda_peft keeps S and B in float32; TRL casts them to bf16 on a quantized base)")


class LamdaCallback(TrainerCallback, ExportableState):
    """Gradual freezing of LaMDA's B under the transformers Trainer (no Trainer subclass needed).

    Args:
        release: what happens to B once fully frozen, as in :func:`lamda_peft.attach_freezing`. Under the Trainer's
            DDP (several processes, ``find_unused_parameters`` unset) ``"auto"`` keeps B masked.
        adapter_name: the LaMDA adapter to freeze (default: the active ones).
        stall_min_decrease: warn when the logged loss fell by less than this fraction over the freezing window
            (``lamda_peft.stall``); ``None`` turns the check off. It needs a logged loss in the first and in the last
            third of the window: ``logging_steps`` at most ``freeze_ratio * max_steps / 3``.
    """

    def __init__(self, release: Release = "auto", adapter_name: Optional[str] = None,
                 stall_min_decrease: Optional[float] = DEFAULT_MIN_DECREASE) -> None:
        self.release = check_release(release)
        self.adapter_name = adapter_name
        self.stall_min_decrease = check_min_decrease(stall_min_decrease)
        self.skipped_steps = 0  # optimizer steps the loss scaler skipped (they do not advance the schedule)
        self.stall_checked = False  # saved: with restore_callback_states_from_checkpoint a resume does not warn twice
        self.freezer: Optional[PMBFreezer] = None

    def state(self) -> dict:
        return {"args": {"release": self.release, "adapter_name": self.adapter_name,
                         "stall_min_decrease": self.stall_min_decrease},
                "attributes": {"skipped_steps": self.skipped_steps, "stall_checked": self.stall_checked}}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        if model is None or optimizer is None:
            raise ValueError("LamdaCallback needs the Trainer's model and optimizer at on_train_begin")
        if state.max_steps is None or state.max_steps <= 0:
            raise ValueError(
                "LamdaCallback needs the number of training steps: set max_steps or num_train_epochs with a dataset "
                "of known length in TrainingArguments"
            )
        restore_float32_factors(model, fresh=state.global_step == 0)
        if self.freezer is not None:  # a second trainer.train(): start from this run's state
            self.freezer.detach()
        self.freezer = attach_freezing(model, optimizer, total_steps=state.max_steps, adapter_name=self.adapter_name,
                                       release=self.release, start_step=state.global_step - self.skipped_steps)

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self.freezer is not None:
            self.skipped_steps = state.global_step - self.freezer.step

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if self.freezer is None or logs is None:
            return
        figures = {"lamda_frozen_columns": self.freezer.frozen_columns,
                   "lamda_frozen_fraction": round(self.freezer.frozen_fraction, 4)}
        if not self.stall_checked and self.freezer.step >= self.freezer.freeze_end_step:
            self.stall_checked = True
            end = self.freezer.freeze_end_step
            ratio = loss_ratio([(e["step"], e["loss"]) for e in state.log_history if "loss" in e], end)
            if ratio is not None:
                figures["lamda_loss_ratio"] = round(ratio, 4)
                if state.is_world_process_zero:
                    warn_if_stalled(ratio, end, self.stall_min_decrease)
        logs.update(figures)
        # The Trainer appended a copy of ``logs`` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.freezer is not None:
            self.freezer.detach()
