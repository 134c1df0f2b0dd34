"""The low-rank delta path shared by LaMDA and LoRA-FA, with a backward that keeps only ``x A^T``.

    y = base(x) + s * (x A^T) M^T,    M = B S - B0S0            (d_out, r)

A (r, d_in) is frozen, so nothing needs ``x`` for a gradient; this module makes sure autograd keeps nothing but
``xa = x A^T`` (n, r) for the adapter path (method.md section 4). M is rebuilt from the parameters in backward
instead of being saved, so no (d_out, r) temporary is kept per layer either.
LoRA-FA is the special case S = I (not trained), B0S0 = 0: M = B.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantized import dense_weight


def low_rank_matrix(B: torch.Tensor, S: Optional[torch.Tensor], B0S0: Optional[torch.Tensor]) -> torch.Tensor:
    """M = B S - B0S0 (d_out, r); exactly zero at init for every init of method.md 3.1."""
    M = B if S is None else B @ S
    return M if B0S0 is None else M - B0S0


class LowRankDelta(torch.autograd.Function):
    """``s * xa @ M^T`` for xa (..., r) -> (..., d_out), saving xa and the (already stored) factors only.

    Gradients (method.md 3.1): dM = s dy^T xa, dB = dM S^T, dS = B^T dM, d(xa) = s dy M.
    The low-rank products run in xa's dtype (the base model's compute dtype); gradients of the fp32 factors are
    returned in float32.
    """

    @staticmethod
    def forward(ctx, xa, B, S, B0S0, scaling: float):
        ctx.save_for_backward(xa, B, S, B0S0)
        ctx.scaling = scaling
        M = low_rank_matrix(B, S, B0S0)
        return torch.nn.functional.linear(xa, (scaling * M).to(xa.dtype))

    @staticmethod
    def backward(ctx, dy):
        xa, B, S, B0S0 = ctx.saved_tensors
        s = ctx.scaling
        need_xa, need_B, need_S = ctx.needs_input_grad[:3]
        d_xa = dB = dS = None
        if need_xa:
            M = low_rank_matrix(B, S, B0S0)
            d_xa = torch.nn.functional.linear(dy, (s * M).to(dy.dtype).T)
        if need_B or need_S:
            dy2 = dy.reshape(-1, dy.shape[-1])
            xa2 = xa.reshape(-1, xa.shape[-1]).to(dy.dtype)
            dM = (dy2.T @ xa2).to(B.dtype).mul_(s)  # (d_out, r)
            if need_B:
                dB = dM if S is None else dM @ S.T
            if need_S:
                dS = B.T @ dM
        return d_xa, dB, dS, None, None


def base_weight_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):  # GPT-2 style: weight is (d_in, d_out); ZeRO-3 keeps the real shape in ds_shape
        shape = getattr(base.weight, "ds_shape", base.weight.shape)
        return shape[0], shape[1]
    raise TypeError(
        f"unsupported layer type {type(base).__name__}: lamda_peft adapts torch.nn.Linear and transformers' Conv1D; "
        "leave this module out of target_modules (or add it to exclude_modules)."
    )


def weight_as_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever the layer's storage convention (dequantized if bnb-quantized)."""
    return dense_weight(base)
