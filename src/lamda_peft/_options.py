"""The rules behind lamda_peft's per-group learning rates and ``--regression-bias``, with nothing heavy imported.

Why a module of its own: ``lamda-peft train`` checks its options before it imports torch, transformers or peft (so
that ``--help``, an option error and Ctrl-C come at once), and these checks and defaults are the library's too. Their
public homes, ``lamda_peft.optim`` and ``lamda_peft.heads``, re-export them.
"""

from __future__ import annotations

from typing import Any

#: lr_S = lr * this (up to rank LAMDA_LR_S_REFERENCE_RANK) and LaMDA's lr_B = lr * that when not given. One Adam step
#: on S moves the model ~9x less than a LoRA step at the same lr (the paper's init makes S's step a *relative* lr on
#: each module's top-r part). On SST-2 at 100 steps (lr 1e-3, r = 8) 10x gave 70.5 (3 seeds) instead of 59.1 at 1x
#: (2 seeds), and 5x 69.6 (paired -0.9 +- 1.6: even within noise). 5x rather than 10x (session 6): at 400 steps it
#: gains 1.3 points on SST-2 (3 seeds, each up), ends LaMDA++'s stall at the label mean on STS-B (81.7 +- 0.6 over 3
#: seeds against 71.2 +- 15.1), and at lr 3e-3 LaMDA learns (74.7) where 10x went to chance. Lowering B's lr gave
#: nothing. docs/learning_rates.md has the numbers.
LAMDA_LR_S_MULTIPLIER = 5.0
LAMDA_LR_B_MULTIPLIER = 1.0
#: Above this rank S's default rate falls as 1/r. Adam moves each of S's r^2 entries by ~lr_S, so a step changes the
#: module by about lr_S * (sigma_1 + ... + sigma_r): it grows with r. At r = 32 the 10x rate never learned (SST-2,
#: 400 steps: 56.4, train loss 0.67) where 3x reached 80.5 and one lr 78.6, and at r = 16 the rule's 5x gave 80.0
#: where 10x gave 75.7 (results/lamda_ablation.md): the 5x holds up to r = 16, as measured there.
LAMDA_LR_S_REFERENCE_RANK = 16
#: Above this rank it falls once more as 1/r (1/r^2 overall): at r = 64 the 1/r rule's rate (1.25x) never learned on
#: one of 3 seeds (SST-2, 400 steps: 50.9, loss 0.69 throughout) and twice it never learned either, while half of it
#: (0.625x) learned on every seed (81.1 / 78.2 / 75.5). At r = 32 the 1/r rate has a 2x margin (5x still learns).
LAMDA_LR_S_STEEP_RANK = 32


def check_lr(name: str, value: Any) -> float:
    """``value`` as a float, if it is a positive finite number (not a bool); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def default_lr_S(lr: float, rank: int) -> float:
    """S's learning rate when none is given: ``lr * LAMDA_LR_S_MULTIPLIER`` up to rank ``LAMDA_LR_S_REFERENCE_RANK``,
    then ``* LAMDA_LR_S_REFERENCE_RANK / rank``, and above ``LAMDA_LR_S_STEEP_RANK`` ``* LAMDA_LR_S_STEEP_RANK / rank``
    once more (5x at r <= 16, 2.5x at r = 32, 0.625x at r = 64)."""
    return (lr * LAMDA_LR_S_MULTIPLIER * min(1.0, LAMDA_LR_S_REFERENCE_RANK / rank)
            * min(1.0, LAMDA_LR_S_STEEP_RANK / rank))


#: the CLI methods trained with these groups (the others use the Trainer's AdamW, one --lr)
GROUPED_METHODS = ("lamda", "lamda++", "lora-fa")


def given_lr_options(args: Any) -> dict[str, float]:
    """The per-group learning rates given on the command line ({} when none: the run's config stays as before)."""
    return {k: getattr(args, k) for k in ("lr_S", "lr_B", "lr_head") if getattr(args, k, None) is not None}


def check_lr_options(args: Any) -> None:
    """Reject per-group learning rates that the method would ignore, or that are not positive (before any work)."""
    given = given_lr_options(args)
    for name, value in given.items():
        check_lr("--" + name.replace("_", "-"), value)
    if given and args.method not in GROUPED_METHODS:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} apply to --method lamda, lamda++ and lora-fa only (got --method {args.method})")
    if args.method == "lora-fa" and "lr_S" in given:
        raise ValueError("--lr-S applies to LaMDA only: LoRA-FA has no core S")


#: ``--regression-bias`` (``lamda_peft.heads.apply_regression_bias``): the head's bias at the labels' mean, or as is
REGRESSION_BIAS_CHOICES = ("label-mean", "zero")
