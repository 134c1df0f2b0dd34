"""The PMB schedule (method.md section 3.2): how many columns of B are frozen after each optimizer step.

    k(t) = min(r, floor(r * t / (freeze_ratio * T)))

after optimizer step t of T, in singular-value order (``largest_first``: columns 0..k-1; ``smallest_first``:
columns r-k..r-1). Pure integer arithmetic on the ratio the user wrote, so no float rounding moves a boundary.
``freezing.py`` applies the schedule to a model and an optimizer; the memory formulas and the plots read it here.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Union

from .tuners.lamda.config import FREEZE_ORDERS


def _exact_ratio(freeze_ratio: Union[float, int, Fraction]) -> Fraction:
    """freeze_ratio as the fraction the user wrote: 0.3 -> 3/10, not the binary float 0.29999999999999998889...

    With the binary value, floor(r t / (0.1 T)) would land one below an exact integer (0.1 is stored slightly high).
    """
    if isinstance(freeze_ratio, (int, Fraction)):
        return Fraction(freeze_ratio)
    return Fraction(repr(float(freeze_ratio)))


def check_freeze_ratio(freeze_ratio: Any) -> Fraction:
    if isinstance(freeze_ratio, bool) or not isinstance(freeze_ratio, (int, float, Fraction)) \
            or not 0 <= freeze_ratio <= 1 or (isinstance(freeze_ratio, float) and math.isnan(freeze_ratio)):
        raise ValueError(
            f"freeze_ratio must be a number in [0, 1] (0 freezes B from the start, 1 at the very end), "
            f"got {freeze_ratio!r}; set LamdaConfig.freeze_ratio accordingly."
        )
    return _exact_ratio(freeze_ratio)


def check_total_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(
            f"total_steps must be a positive integer (the number of optimizer steps of the run, e.g. "
            f"epochs * ceil(batches per epoch / gradient accumulation)), got {total_steps!r}"
        )
    return total_steps


def freeze_count(step: int, total_steps: int, r: int, freeze_ratio: Union[float, Fraction]) -> int:
    """k(t) = min(r, floor(r t / (freeze_ratio T))): how many columns of a rank-r B are frozen after step t.

    Integer arithmetic on the exact fraction, so there is no float rounding at the integer boundaries.
    freeze_ratio = 0 freezes everything from the start (k = r for every t >= 0).
    """
    ratio = _exact_ratio(freeze_ratio)
    if ratio == 0:
        return r
    # r t / (ratio T) = r t den / (num T)
    return min(r, (r * step * ratio.denominator) // (ratio.numerator * total_steps))


def frozen_columns(k: int, r: int, order: str) -> slice:
    """The columns of B frozen when k of r are: 0..k-1 (largest_first) or r-k..r-1 (smallest_first)."""
    if order == "largest_first":
        return slice(0, k)
    if order == "smallest_first":
        return slice(r - k, r)
    raise ValueError(f"freeze_order={order!r} is not supported; choose one of {', '.join(map(repr, FREEZE_ORDERS))}")


def freeze_end_step(total_steps: int, freeze_ratio: Union[float, Fraction]) -> int:
    """ceil(freeze_ratio T): the first step after which k(t) = r for every rank r (0 when B is frozen from the start)."""
    ratio = _exact_ratio(freeze_ratio)
    return -((-ratio.numerator * total_steps) // ratio.denominator)
