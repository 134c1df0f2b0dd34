from .config import LoraFAConfig
from .layer import LoraFALayer, LoraFALinear
from .model import LoraFAModel

__all__ = ["LoraFAConfig", "LoraFALayer", "LoraFALinear", "LoraFAModel"]
