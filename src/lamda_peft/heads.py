"""The regression head's start: its bias at the training labels' mean.

A freshly initialized 1-output head predicts about 0, while regression labels often are not centred (STS-B: mean
2.7, std 1.5). With Adam the bias moves by about ``lr`` per step, so at lr 1e-3 it needs thousands of steps to
reach the mean; meanwhile the fastest way to cut the MSE is to make the encoder's output constant and large, and the
adapters collapse the representation (docs/results/glue.md: 4 of 6 methods predicted a constant on STS-B). Starting
the bias at the mean removes that shortcut for every method alike. The bias is part of the head, which is trained and
saved in full, so a saved model predicts in the labels' own units (nothing to undo at inference).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ._options import REGRESSION_BIAS_CHOICES

#: attribute names of the classification/regression head in transformers' *ForSequenceClassification models (the
#: same names PEFT's SEQ_CLS task type puts into modules_to_save)
HEAD_NAMES = ("classifier", "score")


def regression_output_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` with one output inside the model's head (``classifier`` or ``score``)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
            if linears:
                return linears[-1]
    raise ValueError(
        f"{type(model).__name__} has no 1-output regression head named {' or '.join(HEAD_NAMES)}; load the model "
        "with AutoModelForSequenceClassification(num_labels=1) before setting the head's bias"
    )


@torch.no_grad()
def init_regression_bias(model: nn.Module, labels: Sequence[float]) -> float:
    """Set the regression head's bias to ``mean(labels)`` (call before wrapping with PEFT); returns the mean.

    Raises ValueError if there are no labels, a label is not finite, or the head has no bias (e.g. LLaMA's
    ``score``): then there is no bias to start at the mean.
    """
    values = [float(v) for v in labels]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError("init_regression_bias needs at least one label, all finite")
    layer = regression_output_layer(model)
    if layer.bias is None:
        raise ValueError(
            f"the regression head of {type(model).__name__} has no bias, so it cannot start at the label mean; "
            "pass --regression-bias zero (or centre the labels yourself)"
        )
    mean = sum(values) / len(values)
    layer.bias.fill_(mean)
    return mean


def apply_regression_bias(model: nn.Module, task: str, labels: Sequence[float], choice: str | None) -> str | None:
    """What ``--regression-bias`` asks for; returns a line for the log (None when nothing was done).

    ``choice=None`` (the default) starts a regression head with a bias at the label mean, and notes when the head has
    no bias; an explicit ``"label-mean"`` on a head without bias is an error (nothing is silently ignored).
    """
    if choice is not None and choice not in REGRESSION_BIAS_CHOICES:
        raise ValueError(f"--regression-bias {choice!r}: choose one of {', '.join(REGRESSION_BIAS_CHOICES)}")
    if task != "regression":
        if choice is not None:
            raise ValueError(f"--regression-bias applies to regression tasks only (this is {task})")
        return None
    if choice == "zero":
        return None
    if choice is None and regression_output_layer(model).bias is None:
        return "note: the regression head has no bias; it starts at the model's init (not at the label mean)"
    mean = init_regression_bias(model, labels)
    return f"regression head: bias starts at the training labels' mean, {mean:.4g}"


def __getattr__(name: str) -> Any:
    """``add_regression_bias_argument``, the CLI's, under its old path (imported on use: the library never imports
    cli/)."""
    if name == "add_regression_bias_argument":
        from .cli.arguments import add_regression_bias_argument

        return add_regression_bias_argument
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
