"""What LaMDA and LoRA-FA layers share: the forward of the delta form, merge/unmerge, deferred init.

A subclass declares its containers (PEFT's ``adapter_layer_names`` for trainable ones) and implements
``_factors(adapter) -> (A, B, S, B0S0)``; everything else lives here so both methods compute exactly the same way.

Frozen factors (A, B0S0) are registered as *buffers*, not parameters with ``requires_grad=False``: no PEFT call
(``set_adapter``, ``enable_adapter_layers``, loading with ``is_trainable=True``, ...) can make a buffer trainable,
so the freezing is structural.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from .delta import LowRankDelta, base_weight_shape, low_rank_matrix
from .quantized import add_to_weight, factor_dtype

# Fresh factors for one adapter: returns {container name: tensor} to copy into the placeholders.
InitFn = Callable[[], dict[str, torch.Tensor]]

# Seed of init_weights=False's perturbation, mixed with the module and adapter names: fixed, so every process (and
# every data-parallel rank) perturbs a given layer the same way, whatever the global RNG state.
NON_IDENTITY_SEED = 25


class LowRankDeltaLayer(nn.Module, BaseTunerLayer):
    """Base for a layer computing ``y = base(x) + s * dropout(x A^T) (B S - B0S0)^T``.

    Shapes: x (..., d_in) -> y (..., d_out); A (r, d_in); B, B0S0 (d_out, r); S (r, r).
    """

    #: names of the buffers holding frozen factors, checked on load (subclasses set them)
    frozen_factor_names: tuple[str, ...] = ()
    #: factors kept in the base weight's dtype (A); all others are float32
    base_dtype_factor_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_weight_shape(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.frozen_peft_weight_names = {}  # per instance: PEFT's class-level default is a shared dict
        # Adapters whose factors are placeholders waiting for a checkpoint; see ``_defer_init``.
        self._pending_init: dict[str, InitFn] = {}
        # Columns of B whose gradient is zeroed in backward, per adapter (set by lamda_peft.freezing).
        self.b_frozen_columns: dict[str, slice] = {}
        # Pending adapters whose weights PEFT is loading right now (``expect_checkpoint``): PEFT reads the model's
        # state_dict while matching keys, and that read must not trigger the deferred decomposition.
        self._incoming: set[str] = set()
        # Per adapter, PEFT's ``autocast_adapter_dtype``: True keeps the trained factors (and B0S0) in float32,
        # False stores them in the base layer's dtype. Set by the tuner's ``_cast_adapter_dtype``.
        self.autocast_adapter_dtype: dict[str, bool] = {}
        # A module-level function, not a lambda, so that the whole model pickles (torch.save(model), spawn).
        self.register_state_dict_pre_hook(_materialize_before_state_dict)
        self.kwargs = kwargs

    # -- subclasses -------------------------------------------------------------------------------------
    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        raise NotImplementedError

    def _dropout(self, adapter: str) -> nn.Module:
        raise NotImplementedError

    def _b_grad_transform(self, adapter: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """What B's gradient goes through in backward (None: nothing). Here: zero the frozen columns."""
        columns = self.b_frozen_columns.get(adapter)
        if columns is None:
            return None

        def mask(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:, columns] = 0
            return grad

        return mask

    def _b_for_delta(self, adapter: str, B: torch.Tensor) -> torch.Tensor:
        """B as the delta path uses it: a view carrying a gradient hook where ``_b_grad_transform`` asks for one.

        The hook sits on the tensor the forward uses (the unsharded B under FSDP2), so the gradient is transformed
        before any reduction, clipping or optimizer sees it; a view saves nothing extra for backward.
        """
        if not (B.requires_grad and torch.is_grad_enabled()):
            return B
        transform = self._b_grad_transform(adapter)
        if transform is None:
            return B
        B = B.view_as(B)
        B.register_hook(transform)
        return B

    # -- init -------------------------------------------------------------------------------------------
    def _set_rank(self, adapter: str, r: int, lora_alpha: float, module_name: str) -> None:
        """Record ``r`` and the scale ``lora_alpha / r`` for ``adapter``, after checking that r fits the weight."""
        d_in, d_out = self.in_features, self.out_features
        if not 1 <= r <= min(d_in, d_out):
            raise ValueError(
                f"{module_name or 'module'}: r={r} exceeds min(d_in, d_out) = min({d_in}, {d_out}); use a smaller r, "
                "or a smaller rank for this module in rank_pattern."
            )
        self.r[adapter] = r
        self.scaling[adapter] = lora_alpha / r

    def _assign_factors(self, adapter: str, init_fn: InitFn, *, defer: bool) -> None:
        """Run ``init_fn`` now, or keep it for later if ``defer`` (the adapter is being loaded from a checkpoint).

        Deferred: the placeholders already allocated stay until either ``load_state_dict`` fills the frozen
        factors (then the decomposition never runs) or the adapter is used without a load (then ``init_fn``
        runs on first use, which is the fresh init a newly built adapter gets).
        """
        if defer:
            self._pending_init[adapter] = init_fn
            return
        with torch.no_grad():
            for name, value in init_fn().items():
                getattr(self, name)[adapter].copy_(value)

    def materialize(self) -> None:
        """Run every deferred init now (a no-op when none is pending). Anything that reads the factors' values
        outside the forward (a snapshot of B, an optimizer's copy) must call this first."""
        if self._pending_init:
            self._materialize_pending()

    def _materialize_pending(self, skip_incoming: bool = False) -> None:
        for adapter in list(self._pending_init):
            if skip_incoming and adapter in self._incoming:
                continue
            self._incoming.discard(adapter)
            self._assign_factors(adapter, self._pending_init.pop(adapter), defer=False)

    def expect_checkpoint(self, adapter: str) -> None:
        """Called by the tuner when PEFT starts loading ``adapter``'s weights (see LowRankDeltaTuner)."""
        if adapter in self._pending_init:
            self._incoming.add(adapter)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for adapter in self.r:
            for name in self.frozen_factor_names:
                key = f"{prefix}{name}.{adapter}"
                if key in state_dict and state_dict[key].shape != getattr(self, name)[adapter].shape:
                    raise ValueError(
                        f"adapter checkpoint does not fit this base model: {key} has shape "
                        f"{tuple(state_dict[key].shape)}, but this base layer ({self.in_features} -> "
                        f"{self.out_features}) with rank {self.r[adapter]} needs {tuple(getattr(self, name)[adapter].shape)}. "
                        "Load the adapter onto the base model it was trained on."
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for adapter in list(self._pending_init):
            if all(f"{prefix}{name}.{adapter}" in state_dict for name in self.frozen_factor_names):
                del self._pending_init[adapter]  # the checkpoint supplied the factors: no decomposition
                self._incoming.discard(adapter)

    def _defer_until_weights(self, defer_init: bool) -> bool:
        """Whether a new adapter's init must wait: for a checkpoint (``defer_init``), or for the base weights when the
        base layer is on the meta device (the FSDP2 path: build on meta, ``to_empty``, load the weights; the
        placeholders then hold garbage until the deferred init fills *every* factor on first use)."""
        return defer_init or self.get_base_layer().weight.device.type == "meta"

    # -- dtypes -----------------------------------------------------------------------------------------
    def factor_storage_dtype(self, adapter: str, name: str) -> torch.dtype:
        """The dtype container ``name`` holds for ``adapter``: A always in the base dtype (x A^T needs no cast, so no
        copy of A or x is kept); S, B, B0S0 in float32, or in the base dtype under ``autocast_adapter_dtype=False``."""
        if name in self.base_dtype_factor_names or not self.autocast_adapter_dtype.get(adapter, True):
            return factor_dtype(self.get_base_layer())
        return torch.float32

    def set_autocast_adapter_dtype(self, adapter: str, autocast_adapter_dtype: bool) -> None:
        """PEFT's ``autocast_adapter_dtype`` for ``adapter``, applied now and kept for later moves."""
        if adapter in self.r:
            self.autocast_adapter_dtype[adapter] = autocast_adapter_dtype
            self._place_factors(adapter, device=None)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move to the base layer's device with our dtype policy (``factor_storage_dtype``; PEFT's version casts all
        to the base dtype)."""
        device = device or self.get_base_layer().weight.device
        if device.type != "meta":
            self._place_factors(adapter_name, device)

    def _place_factors(self, adapter: str, device: Optional[torch.device]) -> None:
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ParameterDict, BufferDict)) and adapter in container:
                old = container[adapter]
                new = old.to(device=device, dtype=self.factor_storage_dtype(adapter, name))
                if new is old:
                    continue
                if isinstance(old, nn.Parameter):  # ParameterDict would wrap it with requires_grad=True
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                container[adapter] = new
            elif isinstance(container, nn.ModuleDict) and adapter in container and device is not None:
                container[adapter].to(device)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self._pending_init:
            self._materialize_pending()
        for adapter in self.active_adapters:
            if adapter not in self.r:
                continue
            A, B, S, B0S0 = self._factors(adapter)
            B = self._b_for_delta(adapter, B)
            xa = self._dropout(adapter)(nn.functional.linear(x, A.to(x.dtype)))  # (..., r): all autograd keeps
            delta = LowRankDelta.apply(xa, B, S, B0S0, self.scaling[adapter])
            result = result + delta.to(result.dtype)
        return result

    # -- merge ------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * (B S - B0S0) A in float32, in the base layer's storage layout."""
        if self._pending_init:
            self._materialize_pending()
        A, B, S, B0S0 = self._factors(adapter)
        delta = self.scaling[adapter] * (low_rank_matrix(B, S, B0S0).float() @ A.float())
        return delta.T if isinstance(self.get_base_layer(), Conv1D) else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.r:
                continue
            with torch.no_grad():
                refuse = adapter if safe_merge else None  # safe_merge: NaN/Inf leaves W untouched
                add_to_weight(base, self.get_delta_weight(adapter), refuse_nonfinite=refuse)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.r:
                with torch.no_grad():
                    add_to_weight(base, -self.get_delta_weight(adapter))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        self.b_frozen_columns.pop(adapter_name, None)
        self.autocast_adapter_dtype.pop(adapter_name, None)
        self._pending_init.pop(adapter_name, None)
        self._incoming.discard(adapter_name)


def _materialize_before_state_dict(module: LowRankDeltaLayer, prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook: a deferred init runs before its factors are read, unless PEFT is loading them now."""
    module._materialize_pending(skip_incoming=True)


def perturb_for_non_identity_start(factors: dict[str, torch.Tensor], names: Sequence[str], module_name: str,
                                   adapter: str) -> dict[str, torch.Tensor]:
    """``init_weights=False``: add U(-1/sqrt(r), 1/sqrt(r)) noise to the trainable factors ``names`` (S (r, r),
    B (d_out, r)); the bound is what PEFT's LoRA B gets with ``init_lora_weights=False`` (nn.Linear's init, fan_in r).

    The noise comes from a generator seeded with ``NON_IDENTITY_SEED`` and the module and adapter names, so the same
    layer gets the same start in every process, and two adapters on one layer get different ones.
    """
    key = zlib.crc32(f"{module_name}\0{adapter}".encode())
    generator = torch.Generator().manual_seed(NON_IDENTITY_SEED * 2**32 + key)
    perturbed = dict(factors)
    for name in names:
        value = factors[name].float()
        bound = 1.0 / math.sqrt(value.shape[-1])
        noise = (torch.rand(value.shape, generator=generator) * 2.0 - 1.0) * bound
        perturbed[name] = value + noise.to(value.device)
    return perturbed
