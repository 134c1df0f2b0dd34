"""``lamda-peft train --train-file X`` without ``--validation-file``: a seeded fraction of the training rows held out
for validation, as run_clm's ``--validation_split_percentage`` does (issue 27). ``eval`` rebuilds the same split from
the run's config (train file, percentage, seed)."""

from __future__ import annotations

import random

from ..apps.tables import Table
from . import UsageError

DEFAULT_PERCENTAGE = 10.0


def held_out_count(rows: int, percentage: float) -> int:
    """Validation rows: ``percentage`` of ``rows``, rounded, at least 1."""
    return max(1, round(rows * percentage / 100))


def split_rows(table: Table, percentage: float, seed: int) -> tuple[Table, Table]:
    """(train, validation): a seeded random ``percentage`` of ``table``'s rows held out (both keep the file's order).
    Refused (``UsageError``) when it would leave no training row."""
    count = held_out_count(len(table.rows), percentage)
    if len(table.rows) - count < 1:
        raise UsageError(f"--validation-split-percentage {percentage:g}: the training file has {len(table.rows)} "
                         f"row(s), too few to hold {count} out and still train; pass --validation-file, or a file "
                         "with more rows")
    order = list(range(len(table.rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [row for i, row in enumerate(table.rows) if i not in held]
    val = [row for i, row in enumerate(table.rows) if i in held]
    return Table(table.columns, train, table.source), Table(table.columns, val, table.source)


def notice(percentage: float, rows: int, seed: int) -> str:
    return f"validation: {percentage:g}% of the training rows ({rows} rows) held out, seed {seed}"
