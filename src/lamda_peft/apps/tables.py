"""A table of rows and the error for problems with the user's data: shared by reading tables
(:mod:`lamda_peft.apps.data_loading`) and preparing them (:mod:`lamda_peft.apps.data`), which import them from here.

A table is a list of rows (``dict`` column -> string or number) plus the column names in file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """A problem with the user's data or column choice (message names the problem and the fix)."""


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]
    source: str = ""

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]
