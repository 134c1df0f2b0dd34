from ..._peft_registry import register
from .config import LamdaConfig
from .layer import LamdaLayer, LamdaLinear
from .model import LamdaModel

# Importing the tuner registers it with PEFT, whichever way the user arrives (``import lamda_peft`` registers it when
# peft is imported: lamda_peft/_peft_hook.py).
register("lamda", LamdaConfig, LamdaModel, prefix="lamda_")

__all__ = ["LamdaConfig", "LamdaLayer", "LamdaLinear", "LamdaModel"]
