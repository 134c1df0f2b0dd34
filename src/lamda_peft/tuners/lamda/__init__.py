from .config import LamdaConfig
from .layer import LamdaLayer
from .model import LamdaModel

__all__ = ["LamdaConfig", "LamdaLayer", "LamdaModel"]
