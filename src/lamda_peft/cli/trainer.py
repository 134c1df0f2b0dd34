"""The transformers ``Trainer`` as the command line runs it, with what the stock one gets wrong for a CLI user:

- the logged training loss of a classification or regression model under gradient accumulation: transformers 5
  passes ``num_items_in_batch`` to every model whose ``forward`` takes ``**kwargs`` and then skips its own division
  by the accumulation steps, but a sequence-classification head ignores that count and returns a per-batch mean, so
  the loss (and the gradient) came out multiplied by ``--gradient-accumulation-steps``;
- a resume from the run's last checkpoint trained one step past ``max_steps`` (the Trainer checks the end only
  after a step): ``StopWhenFinished`` stops it before any step, and ``train_model`` says so;
- the evaluation at the last step, which the caller repeats with every task metric: ``SkipFinalEvaluation``;
- the progress bar's log lines as numbers, printed after every callback added its figures, a resumed
  ``LamdaCallback`` included (the Trainer re-adds restored callbacks at the end of the list).
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback


class NothingLeftToTrain(Exception):
    """Raised at ``on_train_begin`` when the resumed checkpoint is already at the run's last step."""


class StopWhenFinished(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs: Any):
        if state.global_step >= state.max_steps:
            raise NothingLeftToTrain


class SkipFinalEvaluation(TrainerCallback):
    """No evaluation at the last step: the caller evaluates the trained model once, with every task metric."""

    def on_step_end(self, args, state, control, **kwargs: Any):
        if state.global_step >= state.max_steps:
            control.should_evaluate = False


class NumericProgress(ProgressCallback):
    """The Trainer's progress bar, with its log lines as numbers (``step 20: loss=0.6931 learning_rate=0.001``)
    rather than a dict of strings."""

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "total_flos"}
        self.training_bar.write(f"step {state.global_step}: " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        """Close the bars now (on Ctrl-C or an early stop), so that the command's last line is its own."""
        for name in ("training_bar", "prediction_bar"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)


LAST = (StopWhenFinished, NumericProgress)  # after every other callback, restored ones included


class CliTrainer(Trainer):
    """The Trainer with the fixes of the module docstring; ``task`` is the DataSpec's (classification, regression or
    causal-lm)."""

    def __init__(self, *args: Any, task: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if task != "causal-lm":  # the head returns a batch mean whatever num_items_in_batch says (module docstring)
            self.model_accepts_loss_kwargs = False
        self.add_callback(StopWhenFinished)
        if self.pop_callback(ProgressCallback) is not None:  # the bar is on (no disable_tqdm): ours instead
            self.add_callback(NumericProgress)

    def _load_callback_state(self) -> None:
        super()._load_callback_state()  # re-adds the restored callbacks (LamdaCallback) at the end of the list
        for cls in LAST:
            callback = self.pop_callback(cls)
            if callback is not None:
                self.add_callback(callback)

    def progress(self) -> NumericProgress | None:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, NumericProgress)), None)
