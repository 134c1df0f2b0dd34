"""What the LaMDA and LoRA-FA tuners share: module replacement with per-module rank and alpha."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key

from .checkpoint import is_loaded_from_checkpoint
from .delta import base_weight_shape


class LowRankDeltaTuner(BaseTuner):
    """A PEFT tuner that wraps each targeted Linear/Conv1D in ``tuner_layer_cls`` (a ``LowRankDeltaLayer``).

    Default target modules per architecture are LoRA's, since the methods adapt the same layers.
    """

    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs: Any):
        if current_key is None:
            raise ValueError("current_key must be given to match rank_pattern and alpha_pattern")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        kwargs = dict(r=r, lora_alpha=alpha, module_name=current_key, defer_init=is_loaded_from_checkpoint(config))
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            base_weight_shape(base)
        except TypeError as err:
            raise TypeError(f"{current_key}: {err}") from None
        new_module = self.tuner_layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trainable until set_adapter selects it
        self._replace_module(parent, target_name, new_module, target)
