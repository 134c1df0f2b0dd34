from .config import LamdaConfig
from .layer import LamdaLayer, LamdaLinear
from .model import LamdaModel

__all__ = ["LamdaConfig", "LamdaLayer", "LamdaLinear", "LamdaModel"]
