"""LoraFAModel: the PEFT tuner that injects LoRA-FA layers."""

from __future__ import annotations

from ..base_model import LowRankDeltaTuner
from .layer import LoraFALayer


class LoraFAModel(LowRankDeltaTuner):
    """Wraps the targeted layers of a model in ``LoraFALayer``; built by ``get_peft_model`` with a LoraFAConfig."""

    prefix: str = "lorafa_"
    tuner_layer_cls = LoraFALayer
