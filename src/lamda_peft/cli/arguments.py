"""Option helpers of ``lamda-peft train`` whose library rules live elsewhere: the per-group learning rates
(``lamda_peft.optim``) and ``--regression-bias`` (``lamda_peft.heads``). Light: the rules come from
``lamda_peft._options``, so building the parser imports no torch. ``lamda_peft.optim.add_lr_arguments`` and
``lamda_peft.heads.add_regression_bias_argument``, their old paths, still give them."""

from __future__ import annotations

from typing import Any

from .._options import (
    LAMDA_LR_S_MULTIPLIER, LAMDA_LR_S_REFERENCE_RANK, LAMDA_LR_S_STEEP_RANK, REGRESSION_BIAS_CHOICES,
)


def add_lr_arguments(parser_group: Any) -> None:
    """The per-group learning-rate options of ``lamda-peft train`` (only LaMDA, LaMDA++ and LoRA-FA use them)."""
    parser_group.add_argument("--lr-S", dest="lr_S", type=float,
                              help=f"LaMDA: learning rate of the core S (default lr x {LAMDA_LR_S_MULTIPLIER:g} up to "
                                   f"r = {LAMDA_LR_S_REFERENCE_RANK}, x {LAMDA_LR_S_MULTIPLIER:g} x "
                                   f"{LAMDA_LR_S_REFERENCE_RANK}/r up to r = {LAMDA_LR_S_STEEP_RANK}, and x "
                                   f"{LAMDA_LR_S_STEEP_RANK}/r once more above)")
    parser_group.add_argument("--lr-B", dest="lr_B", type=float, help="LaMDA, LoRA-FA: learning rate of B (default lr)")
    parser_group.add_argument("--lr-head", dest="lr_head", type=float,
                              help="learning rate of the head trained in full (default lr)")


def add_regression_bias_argument(parser_group: Any) -> None:
    """``--regression-bias`` of ``lamda-peft train``."""
    parser_group.add_argument(
        "--regression-bias", choices=REGRESSION_BIAS_CHOICES,
        help="regression: start the head's bias at the training labels' mean (default, where the head has a bias), "
             "or leave the model's init (zero)")
