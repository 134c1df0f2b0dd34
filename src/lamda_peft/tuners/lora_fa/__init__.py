from ..._peft_registry import register
from .config import LoraFAConfig
from .layer import LoraFALayer, LoraFALinear
from .model import LoraFAModel

# Importing the tuner registers it with PEFT (see lamda_peft/tuners/lamda/__init__.py).
register("lorafa", LoraFAConfig, LoraFAModel, prefix="lorafa_")

__all__ = ["LoraFAConfig", "LoraFALayer", "LoraFALinear", "LoraFAModel"]
