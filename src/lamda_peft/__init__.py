"""lamda_peft: LaMDA, LaMDA++ and LoRA-FA as PEFT methods.

Importing this package registers ``LAMDA`` and ``LORAFA`` with PEFT, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with them like with any PEFT method.
"""

from __future__ import annotations

from ._peft_registry import register
from .callbacks import LamdaCallback
from .export import export_lora
from .freezing import PMBFreezer, attach_freezing
from .schedule import freeze_count
from .optim import lamda_param_groups
from .stall import loss_ratio
from .tuners.lamda import LamdaConfig, LamdaLayer, LamdaModel
from .tuners.lamda.initialize import initialize, initialize_from_activations
from .tuners.lora_fa import LoraFAConfig, LoraFALayer, LoraFAModel
from .tuners.quantized import keep_training_layout

__version__ = "0.1.0"

register("lamda", LamdaConfig, LamdaModel, prefix="lamda_")
register("lorafa", LoraFAConfig, LoraFAModel, prefix="lorafa_")

__all__ = [
    "LamdaCallback",
    "PMBFreezer",
    "attach_freezing",
    "freeze_count",
    "LamdaConfig",
    "LamdaLayer",
    "LamdaModel",
    "LoraFAConfig",
    "LoraFALayer",
    "LoraFAModel",
    "export_lora",
    "initialize",
    "initialize_from_activations",
    "keep_training_layout",
    "lamda_param_groups",
    "loss_ratio",
]
