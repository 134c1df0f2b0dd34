"""The LoRA-FA layer (method.md section 2):

    y = x W0^T + s * dropout(x A^T) B^T

    A  (r, d_in)   frozen buffer (Kaiming-uniform, PEFT LoRA's init of A), in the base weight's dtype
    B  (d_out, r)  trainable, float32, starts at zero

The same delta path as LaMDA with S = I and B0S0 = 0, so only ``x A^T`` (n, r) is kept for backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from peft.tuners._buffer_dict import BufferDict

from ...spectral import kaiming_uniform_factor
from ..base_layer import LowRankDeltaLayer
from .config import LoraFAConfig


class LoraFALayer(LowRankDeltaLayer):
    """A ``torch.nn.Linear`` or transformers ``Conv1D`` with LoRA-FA adapters."""

    adapter_layer_names = ("lorafa_B",)
    other_param_names = ("r", "scaling", "lorafa_A", "lorafa_dropout")
    frozen_factor_names = ("lorafa_A",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraFAConfig, r: int, lora_alpha: float,
                 module_name: str = "", defer_init: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lorafa_A = BufferDict({}, persistent=True)
        self.lorafa_B = nn.ParameterDict({})
        self.lorafa_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha, module_name=module_name, defer_init=defer_init)

    def _factors(self, adapter: str):
        return self.lorafa_A[adapter], self.lorafa_B[adapter], None, None

    def _dropout(self, adapter: str) -> nn.Module:
        return self.lorafa_dropout[adapter]

    def update_layer(self, adapter_name: str, config: LoraFAConfig, r: int, lora_alpha: float, *,
                     module_name: str = "", defer_init: bool = False) -> None:
        d_in, d_out = self.in_features, self.out_features
        if not 1 <= r <= min(d_in, d_out):
            raise ValueError(
                f"{module_name or 'module'}: r={r} exceeds min(d_in, d_out) = min({d_in}, {d_out}); use a smaller r, "
                "or a smaller rank for this module in rank_pattern."
            )
        weight = self.get_base_layer().weight
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / r
        self.lorafa_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lorafa_A[adapter_name] = torch.zeros(r, d_in, device=weight.device, dtype=weight.dtype)
        self.lorafa_B[adapter_name] = nn.Parameter(torch.zeros(d_out, r, device=weight.device, dtype=torch.float32))
        self._assign_factors(
            adapter_name, lambda: {"lorafa_A": kaiming_uniform_factor(r, d_in)}, defer=defer_init
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def __repr__(self) -> str:
        return "lorafa." + super().__repr__()
