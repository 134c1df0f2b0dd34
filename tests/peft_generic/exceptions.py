"""PEFT generic tests that cannot apply to our tuners as written, each with its reason (docs/api.md lists them too).

An entry names the test class, the test, and optionally the case ids it concerns (None: all cases of that test).
``kind`` is "skip" (the test cannot apply) or "xfail" (strict: it runs, and must fail for the stated reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest


@dataclass(frozen=True)
class Exemption:
    cls: str
    test: str
    reason: str
    cases: Optional[frozenset[str]] = None
    kind: Literal["skip", "xfail"] = "skip"

    def mark(self) -> pytest.MarkDecorator:
        if self.kind == "xfail":
            return pytest.mark.xfail(reason=self.reason, strict=True)
        return pytest.mark.skip(reason=self.reason)


MIXED_BATCHES = ("mixed adapter batches (forward(..., adapter_names=[...]), a LoRA feature PEFT also implements for "
                 "RoAd and GLoRA, and whose decoder tests PEFT skips for every other method) are not implemented: "
                 "lamda_peft refuses adapter_names with a ValueError rather than let PEFT drop it silently")

EXCEPTIONS: list[Exemption] = [
    Exemption("TestMixedAdapterBatches", test, MIXED_BATCHES, kind="xfail")
    for test in ("test_mixed_adapter_batches_mlp", "test_mixed_adapter_batches_length_mismatch_raises",
                 "test_mixed_adapter_batches_merged_raises", "test_mixed_adapter_batches_training_mode_raises")
]


def marks_for(cls: str, test: str, case_id: Optional[str]) -> list[pytest.MarkDecorator]:
    """The marks for ``case_id`` of ``cls.test`` (``case_id=None``: the marks of the whole test)."""
    return [e.mark() for e in EXCEPTIONS
            if e.cls == cls and e.test == test and (e.cases is None if case_id is None else
                                                    e.cases is not None and case_id in e.cases)]
