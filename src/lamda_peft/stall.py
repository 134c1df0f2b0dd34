"""Stall check: did the training loss leave its start before LaMDA's B froze?

Once B is fully frozen only S (r x r per module) and the non-adapter trainables (e.g. a classifier head) still move.
A run still at its starting loss by then (a constant prediction: the label entropy or variance) often ends far below:
at S's old 10x rate, LaMDA++ on STS-B held the label mean from step 30 to 320 of 400 and scored 49.9 against 81-83
for the other seeds. This module reads the losses a run logged and says so.

The freezing window is steps (0, E], E = ``freeze_ratio * total_steps`` rounded up. The start is the mean logged loss
over its first third, (0, E/3]; the end, the mean over its last third, (2E/3, E]. The run stalled when the end is less
than ``min_decrease`` (a fraction, default 0.1) below the start. Over 108 logged LaMDA runs of MiniLM (SST-2, MRPC
and STS-B, 100-1600 steps; ``benchmarks/stall_check.py``) the 40 that fell less scored 66.3 on average, the others
78.1; all 14 that ended at chance were among the 40, and none of the others scored below 70.8.

    freezer = lamda_peft.attach_freezing(model, optimizer, total_steps)
    ...                                              # train, keeping losses = [(step, loss), ...]
    # once freezer.step >= freezer.freeze_end_step (None: too few losses in a third of the window)
    ratio = lamda_peft.loss_ratio(losses, freezer.freeze_end_step)
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Iterable, Optional

DEFAULT_MIN_DECREASE = 0.1


def check_min_decrease(value: Any) -> Optional[float]:
    """``None`` (no check) or a fraction in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"stall_min_decrease must be a fraction in [0, 1) (0.1: warn when the loss fell less than "
                         f"10% over the freezing window) or None to turn the check off, got {value!r}")
    return float(value)


def loss_ratio(losses: Iterable[tuple[int, float]], freeze_end: int) -> Optional[float]:
    """Mean loss over the last third of the freezing window (0, ``freeze_end``] over the mean over its first third.

    Args:
        losses: ``(step, loss)`` pairs, each the loss logged at ``step`` (any order; non-finite losses are skipped).
        freeze_end: the step by which B is fully frozen (``PMBFreezer.freeze_end_step``).

    Returns:
        The ratio (below 1: the loss fell), or ``None`` when either third holds no logged loss (a window of fewer
        than 3 steps, or ``logging_steps`` above a third of it) or the start is not positive.
    """
    if freeze_end < 3:
        return None
    logged = [(step, loss) for step, loss in losses if math.isfinite(loss)]
    start = [loss for step, loss in logged if 0 < step <= freeze_end / 3]
    end = [loss for step, loss in logged if 2 * freeze_end / 3 < step <= freeze_end]
    if not start or not end or statistics.fmean(start) <= 0:
        return None
    return statistics.fmean(end) / statistics.fmean(start)


def warn_if_stalled(ratio: Optional[float], freeze_end: int, min_decrease: Optional[float]) -> bool:
    """Warn when ``ratio`` shows a fall of less than ``min_decrease``; return whether it did."""
    if ratio is None or min_decrease is None or ratio <= 1 - min_decrease:
        return False
    warnings.warn(
        f"lamda_peft: the training loss has not left its start by step {freeze_end}, when B became fully frozen: its "
        f"mean over the last third of the freezing window is {ratio:.2f}x the mean over the first third (a fall of "
        f"less than {min_decrease:.0%}). From here only S and the non-adapter trainables move; runs like this often "
        "end far below the others, some at chance. Lower S's rate (lamda_param_groups(model, lr, lr_S=...), --lr-S) "
        "or lr, or keep B training longer (a larger freeze_ratio); see docs/learning_rates.md, 'Stalls'. "
        "LamdaCallback(stall_min_decrease=None) turns this check off.",
        RuntimeWarning, stacklevel=2)
    return True
