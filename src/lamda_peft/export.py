"""Export a trained LaMDA or LoRA-FA adapter as a stock PEFT LoRA adapter for the *original* base weights.

Since A never changes, the learned update is already rank r (method.md 3.1):

    delta W = s (B S - B0S0) A   ->   lora_A = A,  lora_B = B S - B0S0,  lora_alpha / r = s

so no rank doubling is needed (PiSSA's conversion doubles it because its A trains).

The folder also follows vLLM's rules (lamda_peft.serving): one scaling ``lora_alpha / r`` for every module, with
per-module scalings (alpha_pattern, or rank_pattern under a shared alpha) folded into ``lora_B``; ``r`` is the
largest rank; bias none; no DoRA. Serve it with ``vllm serve BASE --enable-lora --lora-modules name=PATH
--max-lora-rank R`` (R >= r, one of ``serving.MAX_LORA_RANKS``).
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

from .serving import vllm_problems
from .tuners.base_layer import LowRankDeltaLayer
from .tuners.delta import low_rank_matrix

PEFT_PREFIX = "base_model.model."


def export_lora(model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                for_vllm: bool = False) -> Path:
    """Write adapter ``adapter_name`` of a lamda_peft ``PeftModel`` to ``path`` as a plain PEFT LoRA adapter.

    The result loads with stock ``PeftModel.from_pretrained(base, path)`` (no lamda_peft needed) on the unmodified
    base model and reproduces the adapted model's outputs. ``modules_to_save`` (e.g. a classifier head) are
    carried over. The folder is written under a temporary name and renamed, so a failure leaves nothing behind.

    ``for_vllm=True`` refuses (ValueError, nothing written) an adapter that vLLM would not serve as trained, e.g. a
    generation adapter with ``modules_to_save``; see ``lamda_peft.serving.vllm_problems``.
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

    # One scaling for all modules (vLLM's rule): s0 = lora_alpha / r of the config, r_export = the largest rank.
    # A module with scaling s_l exports lora_B = (s_l / s0) M; a module of rank r_l < r_export gets rank_pattern r_l
    # and alpha_pattern s0 r_l, so PEFT (alpha_l / r_l) and vLLM (lora_alpha / r, or per-module) all scale by s0.
    s0 = config.lora_alpha / config.r
    r_export = max(layer.r[adapter_name] for layer in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in layers.items():
        A, B, S, B0S0 = layer._factors(adapter_name)
        fold = layer.scaling[adapter_name] / s0
        with torch.no_grad():
            M = low_rank_matrix(B, S, B0S0).detach().float()
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (M if fold == 1.0 else M * fold).cpu().contiguous()
        r = layer.r[adapter_name]
        if r != r_export:
            key = f"^{re.escape(name)}$"
            rank_pattern[key], alpha_pattern[key] = r, s0 * r

    # modules_to_save (heads) keep the key format PEFT uses for them, so take them from PEFT's own state dict
    own = {f"{PEFT_PREFIX}{name}." for name in layers}
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if not any(key.startswith(prefix) for prefix in own):
            tensors[key] = value.detach().cpu().contiguous()

    alpha = s0 * r_export
    lora_config = LoraConfig(
        r=r_export,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=sorted(layers),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values()),
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    if for_vllm:
        problems = vllm_problems(lora_config.to_dict())
        if problems:
            raise ValueError(f"adapter {adapter_name!r} cannot be served by vLLM as trained: " + "; ".join(problems))
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
