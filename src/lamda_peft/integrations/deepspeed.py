"""DeepSpeed ZeRO-3: read a partitioned weight whole, and keep the factors built from it equal on every rank.

Under ZeRO-3 each rank holds a 1/world slice of every parameter (``param.ds_shape`` is the real shape, ``param``
itself an empty placeholder). The spectral init needs the whole weight, so it reads a gathered copy (PEFT's
``gather_params_ctx`` pattern, read only: ``modifier_rank=None``); every rank decomposes the same matrix, and rank 0's
factors are then broadcast so that the ranks agree bit for bit whatever their BLAS does. Both are collectives:
every rank must build the same adapters in the same order (``get_peft_model`` on every rank, as the Trainer does).
DeepSpeed is imported only when a ZeRO-3 parameter is met.
"""

from __future__ import annotations

import torch


def is_zero3_param(tensor: torch.Tensor) -> bool:
    """A parameter partitioned by ZeRO-3 (``deepspeed.zero.Init`` or ``deepspeed.initialize`` with stage 3)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def gathered_copy(param: torch.Tensor) -> torch.Tensor:
    """The whole of a ZeRO-3 parameter, as a plain tensor (collective: every rank must call it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().clone()


def broadcast_from_first_rank(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's values of ``tensors`` on every rank (collective; a no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = {}
    for name, value in tensors.items():
        value = value.contiguous().clone()
        dist.broadcast(value, src=0)
        out[name] = value
    return out
