"""Estimate a training step's memory from the config alone (``estimate_training_step``), with ``prepare_model``
building the meta model once for several methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .formulas import (
    AdaptedModule,
    _dtype_size,
    _family,
    adapter_saved_bytes,
    adapter_trainable_parameters,
    bert_saved_bytes,
    llama_saved_bytes,
    nf4_weight_bytes,
)
from .measure import MemoryReport, _nbytes
from .meta_trace import _meta_batch, _task, adapted_modules, meta_model, traced_saved_bytes


@dataclass
class PreparedModel:
    """What every method's estimate shares: the base model's bytes and the adapted modules (built once)."""

    parameter_bytes: int
    buffer_bytes: int
    modules: list[AdaptedModule]
    head_parameters: list[torch.Tensor]  # trainable copies of modules_to_save (a classification head)


def prepare_model(model_or_config, batch: int, seq: int, r: int = 8, targets: Union[str, list[str]] = "all-linear",
                  dtype: torch.dtype = torch.float32, rank_pattern: Optional[dict[str, int]] = None,
                  task: Optional[str] = None, load_in_4bit: bool = False) -> PreparedModel:
    """Build the meta model once and find its adapted modules; pass the result to ``estimate_training_step``.

    ``load_in_4bit``: the base as transformers loads it with an NF4 ``BitsAndBytesConfig`` (``lamda-peft train
    --load-in-4bit``): every linear layer but the output head in 4-bit, ``dtype`` the compute dtype.
    """
    task = task or _task(model_or_config)
    meta = meta_model(model_or_config, dtype=dtype, task=task)
    param_bytes, buffer_bytes = _nbytes(meta.parameters()), _nbytes(meta.buffers())
    if load_in_4bit:
        param_bytes -= sum(w.numel() * w.element_size() - nf4_weight_bytes(w.numel()) for w in _nf4_weights(meta))
    modules, peft_model = adapted_modules(meta, batch, seq, r, targets, rank_pattern, task)
    return PreparedModel(param_bytes, buffer_bytes, modules, _modules_to_save_parameters(peft_model))


def _nf4_weights(meta: nn.Module) -> list[torch.Tensor]:
    """The weights transformers stores in 4-bit: every ``nn.Linear`` but those it keeps in full precision (the output
    head, tied weights, the last module; ``transformers.quantizers.base.get_keys_to_not_convert``)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = get_keys_to_not_convert(meta)
    return [m.weight for name, m in meta.named_modules() if isinstance(m, nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in keep)]


def estimate_training_step(
    model_or_config,
    batch: int,
    seq: int,
    method: str = "lamda",
    r: int = 8,
    targets: Union[str, list[str]] = "all-linear",
    dtype: torch.dtype = torch.float32,
    rank_pattern: Optional[dict[str, int]] = None,
    task: Optional[str] = None,
    device: str = "cpu",
    prepared: Optional["PreparedModel"] = None,
    load_in_4bit: bool = False,
) -> MemoryReport:
    """Estimate what ``measure_training_step`` would report, without weights or compute.

    ``model_or_config``: a transformers model (only its class and config are used) or a ``PretrainedConfig``.
    ``method``: floor (no adapter, gradients flow to the input embeddings), lora, pissa, lora_frozen_a,
    lorafa, lamda (B training), lamda_frozen (B frozen). LaMDA++ is lamda with a ``rank_pattern``.
    ``device``: where the step would run ("cpu" or "cuda"; dropout masks and CPU attention differ).
    ``load_in_4bit``: the base's linear layers in 4-bit NF4 (see ``prepare_model``).
    The model's own saved activations use the LLaMA or BERT formula, or a meta-device trace for other families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    task = task or _task(model_or_config)
    prepared = prepared or prepare_model(model_or_config, batch, seq, r, targets, dtype, rank_pattern, task,
                                         load_in_4bit)
    modules, family = prepared.modules, _family(config)
    adapter = method != "floor"
    e, f = _dtype_size(dtype), 4

    # the model's own saved activations: inputs need a gradient only for the floor
    if family == "llama":
        model_saved = llama_saved_bytes(config, batch, seq, dtype, inputs_require_grad=not adapter, head=task)
    elif family == "bert":
        model_saved = bert_saved_bytes(config, batch, seq, dtype, inputs_require_grad=not adapter, head=task,
                                       classifier_trainable=adapter, device=device)
    else:
        try:
            model_saved = traced_saved_bytes(meta_model(model_or_config, dtype=dtype, task=task).requires_grad_(False),
                                             _meta_batch(None, batch, seq, task))
        except RuntimeError:  # the forward reads data (see adapted_modules): no estimate for the frozen model
            model_saved = None
    adapter_saved = adapter_saved_bytes(method, modules, dtype)

    # parameters and buffers of the adapters; trainable tensors
    method_params = "lora" if method == "lora_frozen_a" else method
    trainable = 0
    adapter_params = adapter_buffers = n_trainable_tensors = 0
    for m in modules if adapter else []:
        if method_params in ("lora", "pissa"):
            adapter_params += m.r * (m.d_in + m.d_out) * f
        elif method_params == "lorafa":
            adapter_params += m.d_out * m.r * f
            adapter_buffers += m.r * m.d_in * e
        else:  # lamda, lamda_frozen: S and B parameters; A and B0S0 buffers
            adapter_params += (m.r * m.r + m.d_out * m.r) * f
            adapter_buffers += m.r * m.d_in * e + m.d_out * m.r * f
        counted = "lorafa" if method == "lora_frozen_a" else method
        trainable += adapter_trainable_parameters(counted, m.d_in, m.d_out, m.r)
        n_trainable_tensors += {"lora": 2, "pissa": 2, "lamda": 2}.get(counted, 1)
    extra_params = prepared.head_parameters if adapter else []
    trainable_bytes = trainable * f + _nbytes(extra_params)
    n_trainable_tensors += len(extra_params)
    return MemoryReport(
        saved_bytes=(model_saved or 0) + adapter_saved,
        parameter_bytes=prepared.parameter_bytes + adapter_params + _nbytes(extra_params),
        buffer_bytes=prepared.buffer_bytes + adapter_buffers,
        gradient_bytes=trainable_bytes,
        optimizer_state_bytes=2 * trainable_bytes + 4 * n_trainable_tensors if adapter else 0,
        trainable_parameters=trainable + sum(p.numel() for p in extra_params),
        adapter_saved_bytes=adapter_saved,
        details={"model_saved_bytes": model_saved, "adapted_modules": len(modules), "family": family, "task": task},
    )


def _modules_to_save_parameters(peft_model: nn.Module) -> list[torch.Tensor]:
    """Parameters of the trainable copies PEFT makes for modules_to_save (e.g. a classification head)."""
    from peft.utils.other import ModulesToSaveWrapper

    return [p for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)
            for p in m.modules_to_save.parameters()]
