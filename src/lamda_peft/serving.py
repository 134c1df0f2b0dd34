"""What vLLM accepts in a LoRA adapter, checked on an ``adapter_config.json`` (``export_lora`` writes such folders).

vLLM reads a PEFT LoRA folder with its ``PEFTHelper`` (vllm/lora/peft_helper.py) and refuses (``validate_legal``):

    modules_to_save     anything but None, or ["classifier"] / ["score"] for a classification model
    use_dora, lora_bias, layer_replication, a base-modifying init_lora_weights ("pissa", "olora", "corda", "loftq")
    bias != "none"
    a rank above the server's ``--max-lora-rank`` (one of MAX_LORA_RANKS; the max over rank_pattern in new versions)

Older vLLM versions read only ``r`` and ``lora_alpha`` and scale *every* module by ``lora_alpha / r``; newer ones
honour ``rank_pattern`` / ``alpha_pattern`` like PEFT (``lora_alpha_l / r_l``). An adapter loads the same in both
only if every module's PEFT scaling equals ``lora_alpha / r``; ``export_lora`` folds per-module scalings into
``lora_B`` to make it so, and writes compensating ``alpha_pattern`` entries where ranks differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

#: the values vLLM's ``--max-lora-rank`` accepts (vllm/config/lora.py, ``MaxLoRARanks``)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_SUPPORTED_STRING_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_CLASSIFIER_HEADS = ("classifier", "score")


def read_adapter_config(path_or_config: Union[str, os.PathLike, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(path_or_config, dict):
        return path_or_config
    path = Path(path_or_config)
    return json.loads((path / "adapter_config.json" if path.is_dir() else path).read_text())


def smallest_max_lora_rank(rank: int) -> Optional[int]:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (None: above vLLM's largest)."""
    return next((allowed for allowed in MAX_LORA_RANKS if allowed >= rank), None)


def vllm_problems(path_or_config: Union[str, os.PathLike, dict[str, Any]],
                  max_lora_rank: Optional[int] = None) -> list[str]:
    """Why vLLM would refuse this adapter, or serve it with other numbers than PEFT; empty if it loads as is.

    ``max_lora_rank``: the server's ``--max-lora-rank`` (None: the largest vLLM accepts).
    """
    config = read_adapter_config(path_or_config)
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config['peft_type']!r}; vLLM serves LORA adapters only (use export_lora)")
    unsupported_heads = [m for m in config.get("modules_to_save") or [] if m not in _CLASSIFIER_HEADS]
    if unsupported_heads:
        problems.append(f"modules_to_save {unsupported_heads}: vLLM serves no modules_to_save except a classifier "
                        "head ('classifier' or 'score'); train without them, or merge them into the base model")
    for flag in ("use_dora", "lora_bias", "layer_replication", "use_qalora"):
        if config.get(flag):
            problems.append(f"{flag} is set; vLLM does not support it")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_STRING_INITS:
        problems.append(f"init_lora_weights={init!r} modifies the base weights when PEFT loads it; vLLM refuses it")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}; vLLM supports bias='none' only")
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    top = max([r, *ranks.values()])
    limit = max_lora_rank if max_lora_rank is not None else MAX_LORA_RANKS[-1]
    if top > limit:
        problems.append(f"rank {top} is above max_lora_rank {limit}")
    if max_lora_rank is not None and max_lora_rank not in MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one vLLM accepts ({MAX_LORA_RANKS})")
    if config.get("use_rslora"):
        problems.append("use_rslora: older vLLM versions scale by lora_alpha / r regardless; export without rsLoRA")
    for key in sorted(set(ranks) | set(alphas)):
        scaling = alphas.get(key, alpha) / ranks.get(key, r)
        if abs(scaling - alpha / r) > 1e-9 * abs(alpha / r):
            problems.append(f"module pattern {key!r} scales by {scaling:g}, not lora_alpha / r = {alpha / r:g}: "
                            "vLLM versions that read only r and lora_alpha would drop it (fold it into lora_B)")
    return problems
