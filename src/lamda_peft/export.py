"""Export a trained LaMDA or LoRA-FA adapter as a stock PEFT LoRA adapter for the *original* base weights.

Since A never changes, the learned update is already rank r (method.md 3.1):

    delta W = s (B S - B0S0) A   ->   lora_A = A,  lora_B = B S - B0S0,  lora_alpha / r = s

so no rank doubling is needed (PiSSA's conversion doubles it because its A trains).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .tuners.base_layer import LowRankDeltaLayer
from .tuners.delta import low_rank_matrix

PEFT_PREFIX = "base_model.model."


def export_lora(model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of a lamda_peft ``PeftModel`` to ``path`` as a plain PEFT LoRA adapter.

    The result loads with stock ``PeftModel.from_pretrained(base, path)`` (no lamda_peft needed) on the unmodified
    base model and reproduces the adapted model's outputs. ``modules_to_save`` (e.g. a classifier head) are
    carried over. The folder is written under a temporary name and renamed, so a failure leaves nothing behind.
    """
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(
            f"no adapter named {adapter_name!r} on this model (adapters: {sorted(getattr(model, 'peft_config', {}))}); "
            "pass adapter_name= one of them, or a model built by get_peft_model / PeftModel.from_pretrained"
        )
    config = model.peft_config[adapter_name]
    layers = {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LowRankDeltaLayer) and adapter_name in module.r
    }
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} is not a LaMDA or LoRA-FA adapter; export_lora converts only those")
    if any(adapter_name in module.merged_adapters for module in layers.values()):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; call model.unmerge_adapter() first")

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in layers.items():
        A, B, S, B0S0 = layer._factors(adapter_name)
        with torch.no_grad():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = low_rank_matrix(B, S, B0S0).detach().float().cpu().contiguous()
        key = f"^{re.escape(name)}$"
        r = layer.r[adapter_name]
        if r != config.r:
            rank_pattern[key] = r
        alpha = layer.scaling[adapter_name] * r
        if alpha != config.lora_alpha:
            alpha_pattern[key] = alpha

    # modules_to_save (heads) keep the key format PEFT uses for them, so take them from PEFT's own state dict
    own = {f"{PEFT_PREFIX}{name}." for name in layers}
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if not any(key.startswith(prefix) for prefix in own):
            tensors[key] = value.detach().cpu().contiguous()

    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=sorted(layers),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values()),
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return write_adapter_atomically(path, lora_config, tensors)


def write_adapter_atomically(path: str | os.PathLike, config, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into a temporary folder beside ``path``, then
    move it into place; an existing ``path`` is replaced only once the new folder is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
