"""LamdaModel: the PEFT tuner that injects LaMDA layers (see layer.py for the math)."""

from __future__ import annotations

from ..base_model import LowRankDeltaTuner
from .layer import LamdaLayer


class LamdaModel(LowRankDeltaTuner):
    """Wraps the targeted layers of a model in ``LamdaLayer``; built by ``peft.get_peft_model`` with a LamdaConfig."""

    prefix: str = "lamda_"
    tuner_layer_cls = LamdaLayer
