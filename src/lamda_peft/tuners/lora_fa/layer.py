"""The LoRA-FA layer (method.md section 2):

    y = x W0^T + s * dropout(x A^T) B^T

    A  (r, d_in)   frozen buffer (Kaiming-uniform, PEFT LoRA's init of A), in the base weight's dtype
    B  (d_out, r)  trainable, float32, starts at zero

The same delta path as LaMDA with S = I and B0S0 = 0, so only ``x A^T`` (n, r) is kept for backward.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn
from peft.tuners._buffer_dict import BufferDict

from ...spectral import kaiming_uniform_factor
from ..base_layer import LowRankDeltaLayer, perturb_for_non_identity_start
from ..quantized import factor_dtype
from .config import LoraFAConfig


class LoraFALinear(LowRankDeltaLayer):
    """A ``torch.nn.Linear`` or transformers ``Conv1D`` with LoRA-FA adapters."""

    adapter_layer_names = ("lorafa_B",)
    other_param_names = ("r", "scaling", "lorafa_A", "lorafa_dropout", "grad_correction")
    frozen_factor_names = ("lorafa_A",)
    base_dtype_factor_names = ("lorafa_A",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraFAConfig, r: int, lora_alpha: float,
                 module_name: str = "", defer_init: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lorafa_A = BufferDict({}, persistent=True)
        self.lorafa_B = nn.ParameterDict({})
        self.lorafa_dropout = nn.ModuleDict({})
        self.grad_correction: dict[str, bool] = {}
        # (A A^T)^+ per adapter, with the A it was computed from and its (version, address): A is frozen, so this is
        # computed once, and again only if A is replaced or filled in place (e.g. by a checkpoint).
        self._aat_pinv: dict[str, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha, module_name=module_name, defer_init=defer_init)

    def _factors(self, adapter: str):
        return self.lorafa_A[adapter], self.lorafa_B[adapter], None, None

    def _dropout(self, adapter: str) -> nn.Module:
        return self.lorafa_dropout[adapter]

    def _b_grad_transform(self, adapter: str):
        """LoRA-FA v2 (method.md section 2): g_B <- (1/s^2) g_B (A A^T)^+, applied in backward, before clipping."""
        if not self.grad_correction.get(adapter, False):
            return super()._b_grad_transform(adapter)
        factor = self._aat_pinv_of(adapter) / self.scaling[adapter] ** 2  # (r, r)

        def correct(grad: torch.Tensor) -> torch.Tensor:
            return grad @ factor.to(grad.dtype)

        return correct

    def _aat_pinv_of(self, adapter: str) -> torch.Tensor:
        A = self.lorafa_A[adapter]
        cached = self._aat_pinv.get(adapter)
        # The entry keeps the A it was computed from alive, so ``is`` cannot be fooled by a new A allocated at a freed
        # address (an address and version counter can be reused); the version and address catch in-place changes.
        if cached is None or not (cached[0] is A and cached[1] == (A._version, A.data_ptr())):
            A64 = A.detach().double()
            pinv = torch.linalg.pinv(A64 @ A64.T).float()  # r x r; A A^T = I for orthonormal rows
            cached = (A, (A._version, A.data_ptr()), pinv)
            self._aat_pinv[adapter] = cached
        return cached[2]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._aat_pinv.pop(adapter_name, None)

    def update_layer(self, adapter_name: str, config: LoraFAConfig, r: int, lora_alpha: float, *,
                     module_name: str = "", defer_init: bool = False) -> None:
        d_in, d_out = self.in_features, self.out_features
        self._set_rank(adapter_name, r, lora_alpha, module_name)
        weight = self.get_base_layer().weight
        self.grad_correction[adapter_name] = config.grad_correction
        self.lorafa_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lorafa_A[adapter_name] = torch.zeros(r, d_in, device=weight.device, dtype=factor_dtype(self.get_base_layer()))
        self.lorafa_B[adapter_name] = nn.Parameter(torch.zeros(d_out, r, device=weight.device, dtype=torch.float32))
        self._aat_pinv.pop(adapter_name, None)
        defer = self._defer_until_weights(defer_init)
        # A deferred draw runs at first use, when the ranks of a data-parallel run may have used their global RNGs
        # differently (data order, dropout): draw its seed now, while they agree, so every rank gets the same A.
        seed = int(torch.randint(0, 2**62, (1,), device="cpu")) if defer else None
        # init_weights=False: a seeded perturbation of B, part of the fresh init (a loaded adapter never runs it)
        perturb = None if config.init_weights else (module_name, adapter_name)
        init_fn = functools.partial(initial_factors, r, d_in, d_out, seed, perturb)  # picklable, unlike a lambda
        self._assign_factors(adapter_name, init_fn, defer=defer)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def __repr__(self) -> str:
        return "lorafa." + super().__repr__()


def initial_factors(r: int, d_in: int, d_out: int, seed: Optional[int] = None,
                    perturb: Optional[tuple[str, str]] = None) -> dict[str, torch.Tensor]:
    """LoRA-FA's init: A Kaiming-uniform (PEFT LoRA's init of A), B = 0. Both are set, so a layer whose placeholders
    hold garbage (a meta-device base after ``to_empty``) is fully initialised. ``seed``: draw A from its own
    generator (a deferred init) instead of the global RNG. ``perturb`` (module name, adapter name): init_weights=False,
    B gets a seeded perturbation (``perturb_for_non_identity_start``)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    factors = {"lorafa_A": kaiming_uniform_factor(r, d_in, generator), "lorafa_B": torch.zeros(d_out, r)}
    if perturb is not None:
        factors = perturb_for_non_identity_start(factors, ("lorafa_B",), *perturb)
    return factors


# PEFT recognises an already-wrapped layer as linear (for "all-linear" on a second adapter) by the "Linear" in
# its class name; LoraFALayer is the name used across lamda_peft.
LoraFALayer = LoraFALinear
