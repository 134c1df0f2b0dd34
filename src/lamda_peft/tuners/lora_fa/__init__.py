from .config import LoraFAConfig
from .layer import LoraFALayer
from .model import LoraFAModel

__all__ = ["LoraFAConfig", "LoraFALayer", "LoraFAModel"]
