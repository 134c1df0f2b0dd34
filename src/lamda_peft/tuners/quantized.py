"""A quantized base layer (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, QLoRA-style) under a delta adapter.

The delta form never rewrites the base weight, so a quantized base stays quantized: the adapter only needs

    the weight as numbers     the spectral init decomposes the *dequantized* weight Q(W0), the exact matrix the
                              quantized layer multiplies by, so ``s B0S0 A`` is the top-r part of what the model uses
    a floating factor dtype   A lives in the layer's compute dtype (bnb 4-bit: ``compute_dtype``), never uint8/int8
    a merge path              dequantize, add the delta, quantize again (PEFT's LoRA does the same), with a warning:
                              the re-quantized weight rounds the sum, so a merged model is close, not equal
    real byte counts          a packed 4-bit weight holds d_out d_in / 2 bytes plus its quantization state
    one weight layout         bnb's CPU inference repack is switched off (``keep_training_layout``, below)

Plain ``nn.Linear`` / ``Conv1D`` layers go through the same functions unchanged. bitsandbytes is imported only when
a quantized layer is met, so it stays an optional dependency (``pip install lamda-peft[quant]``).
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..integrations.deepspeed import gathered_copy, is_zero3_param

QuantKind = Literal["4bit", "8bit"]


def quant_kind(base: nn.Module) -> Optional[QuantKind]:
    """'4bit' for a bitsandbytes ``Params4bit`` weight, '8bit' for ``Int8Params``, None for a plain weight."""
    name = type(getattr(base, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def keep_training_layout(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU inference repack on every ``Linear4bit`` of ``model`` and undo any repack
    already done; returns how many layers were repacked.

    On a CPU with AVX512-BF16, bnb (0.49-0.50) rewrites a ``Linear4bit``'s weight in place into a CPU-only layout
    at its first eval-mode forward without gradients (an evaluation pass). Measured on a 96 x 128 layer: afterwards
    no gradient flows through the layer to its input (earlier layers' adapters silently stop learning), bnb's own
    ``dequantize_4bit`` reads the weight 0.18 off (so a spectral init or a merge would use a wrong matrix), the
    output moves by 7e-3, and layers with fewer than 64 inputs crash. A training library cannot afford any of it,
    so the flag that allows the repack is turned off for every 4-bit layer, targeted or not (gradients pass
    through the frozen ones too)."""
    repacked = 0
    for module in model.modules():
        # the bnb layer itself, not an adapter layer whose ``weight`` is its base layer's (as in quantization_state_bytes)
        if quant_kind(module) != "4bit" or "weight" not in module._parameters:
            continue
        module.support_avx512bf16_for_cpu = False
        weight, state = module.weight, module.weight.quant_state
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            repacked += 1
    if repacked:
        warnings.warn(
            f"{repacked} bitsandbytes 4-bit layers had been repacked for CPU inference (an evaluation pass before the "
            "adapter was added) and were converted back; the repack stores the block scales in bfloat16, so these "
            "weights now differ from the checkpoint's by about 1e-3. Add the adapter before any evaluation pass, or "
            "reload the base model, for the exact quantized weights.", stacklevel=2)
    return repacked


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The weight the layer multiplies by, as a floating (d_out, d_in) tensor: dequantized for a bnb layer,
    gathered for a DeepSpeed ZeRO-3 partitioned one."""
    kind = quant_kind(base)
    if kind is not None:
        import bitsandbytes.functional as F

        weight = base.weight
        if kind == "4bit":
            return F.dequantize_4bit(weight.data, weight.quant_state).detach()
        # PEFT's dequantize_module_weight moves an 8-bit CPU weight through .to(), which drops its scales (SCB)
        scales = weight.SCB if weight.SCB is not None else base.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).detach()
    weight = base.weight
    if is_zero3_param(weight):  # partitioned by DeepSpeed ZeRO-3: read it whole (a collective)
        weight = gathered_copy(weight)
    return weight.T if isinstance(base, Conv1D) else weight


def factor_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of the frozen A: the base weight's dtype, or for a quantized base its compute dtype.

    bnb's 4-bit layer names its compute dtype (``bnb_4bit_compute_dtype``; float32 if unset). The 8-bit layer has
    none (it computes in the input's dtype); its bias dtype (the model's dtype) is used, else float32.
    """
    kind = quant_kind(base)
    if kind is None:
        return base.weight.dtype
    if kind == "4bit" and getattr(base, "compute_dtype", None) is not None:
        return base.compute_dtype
    bias = getattr(base, "bias", None)
    return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32


def add_to_weight(base: nn.Module, delta: torch.Tensor, refuse_nonfinite: Optional[str] = None) -> None:
    """``W <- W + delta`` for ``delta`` in the layer's storage layout (float32); a bnb weight is re-quantized.

    ``refuse_nonfinite`` (the adapter's name, for ``safe_merge``): raise, writing nothing, if the sum has NaN/Inf,
    with PEFT's own message (code that matches on LoRA's ``safe_merge`` error matches ours).
    """
    kind = quant_kind(base)
    with torch.no_grad():
        merged = (base.weight if kind is None else dense_weight(base)).float() + delta.float()
        if refuse_nonfinite is not None and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {refuse_nonfinite} seems to be broken")
        if kind is None:
            base.weight.copy_(merged.to(base.weight.dtype))
            return
        warnings.warn(
            f"merging into a {kind} quantized layer re-quantizes the sum W0 + delta W, so the merged model is close to "
            "the adapted one, not equal (PEFT's LoRA does the same); to keep the exact adapted model, serve the base "
            "with the adapter unmerged, or merge into a full-precision copy of the base",
            stacklevel=3,
        )
        _requantize(base, merged)


def _requantize(base: nn.Module, weight: torch.Tensor) -> None:
    """Replace a bnb layer's weight by the quantization of the float ``weight`` (d_out, d_in), as PEFT's LoRA does."""
    import bitsandbytes as bnb

    old = base.weight
    if quant_kind(base) == "4bit":
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        base.weight = bnb.nn.Params4bit(weight.to(base.compute_dtype or torch.float32).cpu(), **kwargs).to(old.device)
    else:
        base.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()
        base.state.SCB = base.weight.SCB


def quantization_state_bytes(model: nn.Module) -> int:
    """Bytes of the quantization state of every bnb weight in ``model`` (4-bit: absmax, code and, with double
    quantization, the nested state; 8-bit: the per-row scales SCB). The packed weights themselves are parameters,
    already counted by ``numel() * element_size()``."""
    total = 0
    for module in model.modules():
        # an adapter layer's ``weight`` is its base layer's (PEFT's BaseTunerLayer property): count it once
        kind = quant_kind(module) if "weight" in module._parameters else None
        if kind == "4bit" and module.weight.quant_state is not None:
            total += _tensor_bytes(module.weight.quant_state.as_dict(packed=False))
        elif kind == "8bit" and getattr(module.weight, "SCB", None) is not None:
            total += module.weight.SCB.numel() * module.weight.SCB.element_size()
    return total


def _tensor_bytes(tree) -> int:
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0
