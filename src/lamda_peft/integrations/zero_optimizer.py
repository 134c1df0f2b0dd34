"""The freezing schedule under DeepSpeed ZeRO (stages 1-3): find ZeRO's optimizer, hook its step, freeze columns.

ZeRO's optimizer does not hold B: it holds flat fp32 partitions (the *master* copy, a slice of every parameter per
rank) and, after each step, copies them back into the working parameters (ZeRO-1/2: B whole on every rank; ZeRO-3:
``B.ds_tensor``, this rank's slice of B). A frozen column must therefore be held in both places, on the slice each
rank owns (and in the whole B that ZeRO-3 keeps gathered for a small, "persistent", parameter):

    master[i] = working[i] = snapshot.flatten()[offset + i]   for every i of this rank's slice in a frozen column

The writes are local (no collective), after ZeRO's whole step, so AdamW's momentum and weight decay cannot move a
frozen column. The snapshot itself is read whole from the master copy (``safe_get_full_fp32_param``: a collective,
run by every rank at the same step, since all ranks follow the same schedule). The backward mask of
``LowRankDeltaLayer`` still zeroes the frozen columns' gradient before ZeRO reduces it (the forward uses B gathered).

DeepSpeed is imported only when its optimizer is met.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional

import torch

from .deepspeed import is_zero3_param

StepHook = Callable[[Any, tuple, dict], None]


def find_zero_optimizer(optimizer: Any) -> Optional[Any]:
    """The DeepSpeed ZeRO optimizer in ``optimizer``'s ``.optimizer`` chain (accelerate's wrapper, the engine's
    optimizer itself), else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, ZeROOptimizer):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def unwrap_engine(model: Any) -> Any:
    """The module a DeepSpeedEngine wraps (``deepspeed.initialize``'s first return value), else ``model``."""
    if "deepspeed" in sys.modules:
        from deepspeed import DeepSpeedEngine

        while isinstance(model, DeepSpeedEngine):
            model = model.module
    return model


def holds(zero_optimizer: Any, param: torch.nn.Parameter) -> bool:
    """Whether ZeRO's optimizer trains ``param`` (ZeRO-1/2 keep ``bit16_groups``, ZeRO-3 ``fp16_groups``)."""
    groups = getattr(zero_optimizer, "fp16_groups", None) or getattr(zero_optimizer, "bit16_groups", None) or []
    return any(p is param for group in groups for p in group)


class _StepHooks:
    """Runs ``before`` and ``after`` around ZeRO's ``step`` (an instance attribute shadowing the class method);
    ``after`` is skipped when the loss scaler found an overflow and ZeRO skipped the update."""

    def __init__(self, zero_optimizer: Any, before: StepHook, after: StepHook) -> None:
        self.zero_optimizer = zero_optimizer
        self.shadowed = zero_optimizer.__dict__.get("step")  # another instance-level wrapper, if any
        inner_step = zero_optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            before(zero_optimizer, args, kwargs)
            out = inner_step(*args, **kwargs)
            if not getattr(zero_optimizer, "overflow", False):
                after(zero_optimizer, args, kwargs)
            return out

        self.step = step
        zero_optimizer.step = step

    def remove(self) -> None:
        if self.zero_optimizer.__dict__.get("step") is not self.step:
            return  # already removed (or wrapped again by someone else: leave their wrapper in place)
        if self.shadowed is None:
            del self.zero_optimizer.step
        else:
            self.zero_optimizer.step = self.shadowed


def register_step_hooks(zero_optimizer: Any, before: StepHook, after: StepHook) -> _StepHooks:
    """Call ``before``/``after`` around every step ZeRO's optimizer takes; ``.remove()`` undoes it."""
    return _StepHooks(zero_optimizer, before, after)


def full_master_value(param: torch.nn.Parameter) -> torch.Tensor:
    """``param`` whole, from ZeRO's fp32 master copy (collective: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is None:
        raise ValueError("DeepSpeed has no fp32 master copy of this parameter (is it trainable, and held by the "
                         "engine's optimizer?)")
    return value.detach().clone()


@functools.lru_cache(maxsize=4096)
def _frozen_positions(rows: int, r: int, start: int, stop: int, offset: int, n: int) -> torch.Tensor:
    """Indices i < n of a flat slice starting at ``offset`` of a row-major (rows, r) tensor whose element lies in
    columns [start, stop). Cached: the same (B, slice, frozen columns) repeats every step until the next freeze."""
    index = torch.arange(offset, offset + n)
    column = index % r
    return (index[(column >= start) & (column < stop)] - offset)


def group_of(zero_optimizer: Any, param: torch.nn.Parameter) -> Optional[dict]:
    """The torch param group (lr, weight_decay) under which ZeRO trains ``param``'s flat partition, or None."""
    groups = getattr(zero_optimizer, "fp16_groups", None) or getattr(zero_optimizer, "bit16_groups", None) or []
    for index, group in enumerate(groups):
        if any(p is param for p in group):
            return zero_optimizer.optimizer.param_groups[index]
    return None


def _add_on_columns(flat: torch.Tensor, offset: int, value: torch.Tensor, scale: float, columns: slice) -> None:
    """flat[i] += scale * value.flatten()[offset + i] wherever that element lies in ``columns`` (``value`` 2-D,
    ``flat`` a 1-D slice of the row-major parameter starting at ``offset``)."""
    rows, r = value.shape
    n = max(0, min(flat.numel(), value.numel() - offset))
    start, stop, _ = columns.indices(r)
    positions = _frozen_positions(rows, r, start, stop, offset, n).to(flat.device)
    addend = value.flatten()[offset + positions.to(value.device)].to(device=flat.device, dtype=flat.dtype)
    flat[positions] += scale * addend


@torch.no_grad()
def add_on_columns(param: torch.nn.Parameter, value: torch.Tensor, scale: float, columns: slice) -> None:
    """``param[:, columns] += scale * value[:, columns]`` in this rank's slice of ZeRO's master copy and of the
    working parameter (local writes, as ``restore_columns``)."""
    value = value.reshape(value.shape[0], -1)
    if is_zero3_param(param):
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)
        offset = master.numel() * dist.get_rank(group=param.ds_process_group)
        _add_on_columns(master, offset, value, scale, columns)
        safe_set_local_fp32_param(param, master)
        _add_on_columns(param.ds_tensor.data.view(-1), offset, value, scale, columns)
        if param.data.numel() == value.numel():  # gathered now: a small "persistent" parameter stays whole
            param.data.view(value.shape)[:, columns] += (scale * value[:, columns]).to(param.dtype)
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        _add_on_columns(mapping.get_hp_fragment(), mapping.lp_fragment_address.start, value, scale, columns)
    param.data[:, columns] += (scale * value[:, columns]).to(param.dtype)


def _write_frozen(flat: torch.Tensor, offset: int, snapshot: torch.Tensor, columns: slice) -> None:
    """flat[i] = snapshot.flatten()[offset + i] wherever that element lies in ``columns`` (flat: a 1-D slice of the
    row-major (d_out, r) parameter starting at ``offset``, possibly padded past its end)."""
    rows, r = snapshot.shape
    n = max(0, min(flat.numel(), snapshot.numel() - offset))
    start, stop, _ = columns.indices(r)
    positions = _frozen_positions(rows, r, start, stop, offset, n).to(flat.device)
    flat[positions] = snapshot.flatten()[offset + positions.to(snapshot.device)].to(device=flat.device,
                                                                                     dtype=flat.dtype)


@torch.no_grad()
def restore_columns(param: torch.nn.Parameter, snapshot: torch.Tensor, columns: slice) -> None:
    """Put ``snapshot[:, columns]`` back into this rank's slice of ZeRO's master copy and of the working parameter."""
    if is_zero3_param(param):
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)  # this rank's slice, padded to the partition size
        offset = master.numel() * dist.get_rank(group=param.ds_process_group)
        _write_frozen(master, offset, snapshot, columns)
        safe_set_local_fp32_param(param, master)
        _write_frozen(param.ds_tensor.data.view(-1), offset, snapshot, columns)
        if param.data.numel() == snapshot.numel():  # gathered now: a small "persistent" parameter stays whole
            param.data.view(snapshot.shape)[:, columns] = snapshot[:, columns].to(param.dtype)
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2: this rank's fragment of the master copy (None: it holds no part of B)
        _write_frozen(mapping.get_hp_fragment(), mapping.lp_fragment_address.start, snapshot, columns)
    param.data[:, columns] = snapshot[:, columns].to(param.dtype)
