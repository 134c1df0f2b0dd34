"""PEFT's test classes re-parametrized with our tables.

A PEFT test is parametrized over one of PEFT's tables of methods (``TEST_CASES``, ``ALL_CONFIGS``, ...), often
together with a table of models. For each such test we build a copy whose parametrization takes our cases instead
(tables are matched by identity, so a renamed or new PEFT table is simply not ours); tests parametrized over none of
the method tables exercise one specific PEFT method (LoRA, prompt tuning, ...) and are left out.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from .exceptions import marks_for
from .tables import Case


@dataclass(frozen=True)
class Swap:
    upstream: Any  # PEFT's table object, matched by identity
    cases: list[Case]
    methods: bool  # a table of methods (configs) rather than of models


def reparametrized(cls: type, swaps: list[Swap]) -> type:
    """A subclass of PEFT's test class ``cls`` whose tests run over our cases, carrying the reasoned exceptions of
    exceptions.py; PEFT's other tests are hidden (set to None)."""
    namespace: dict[str, Any] = {"__doc__": f"PEFT's {cls.__name__} on lamda_peft's tuners (tests/peft_generic)."}
    for name in dir(cls):
        test = getattr(cls, name)
        if name.startswith("test_") and callable(test):
            namespace[name] = _adapted(cls.__name__, name, test, swaps)
    return type(cls.__name__, (cls,), namespace)


def _adapted(cls_name: str, name: str, test: Callable, swaps: list[Swap]) -> Callable | None:
    marks, ours = [], False
    for mark in getattr(test, "pytestmark", []):
        swap = _swap_of(mark, swaps)
        if swap is None:
            marks.append(mark)
            continue
        ours |= swap.methods
        params = [pytest.param(*case.values, id=case.id,
                               marks=marks_for(cls_name, name, case.id) if swap.methods else ())
                  for case in swap.cases]
        kwargs = {k: v for k, v in mark.kwargs.items() if k != "ids"}  # ids belong to PEFT's table
        marks.append(pytest.mark.parametrize(mark.args[0], params, **kwargs).mark)
    if not ours:
        return None
    marks += [m.mark for m in marks_for(cls_name, name, None)]
    return _with_marks(test, marks)


def _swap_of(mark: pytest.Mark, swaps: list[Swap]) -> Swap | None:
    if mark.name != "parametrize" or len(mark.args) < 2:
        return None
    return next((swap for swap in swaps if mark.args[1] is swap.upstream), None)


def _with_marks(function: types.FunctionType, marks: list) -> types.FunctionType:
    """A copy of ``function`` carrying ``marks`` (PEFT's function object itself is left as it is)."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__dict__.update(function.__dict__)
    copy.__kwdefaults__, copy.__qualname__ = function.__kwdefaults__, function.__qualname__
    copy.__doc__ = function.__doc__
    copy.pytestmark = marks
    return copy
