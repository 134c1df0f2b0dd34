"""lamda_peft: LaMDA, LaMDA++ and LoRA-FA as PEFT methods.

Importing this package registers ``LAMDA`` and ``LORAFA`` with PEFT, so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with them like with any PEFT method.

The import itself is light: torch, transformers and peft are imported when a public name is first used (PEP 562),
and the registration runs as soon as peft is imported, whichever comes first (``_peft_hook``). The ``lamda-peft``
command relies on it to answer ``--help`` and option errors, and to handle Ctrl-C, before those imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from . import _peft_hook

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "LamdaCallback": ".callbacks",
    "PMBFreezer": ".freezing",
    "attach_freezing": ".freezing",
    "freeze_count": ".schedule",
    "LamdaConfig": ".tuners.lamda",
    "LamdaLayer": ".tuners.lamda",
    "LamdaModel": ".tuners.lamda",
    "LoraFAConfig": ".tuners.lora_fa",
    "LoraFALayer": ".tuners.lora_fa",
    "LoraFAModel": ".tuners.lora_fa",
    "export_lora": ".export",
    "initialize": ".tuners.lamda.initialize",
    "initialize_from_activations": ".tuners.lamda.initialize",
    "keep_training_layout": ".tuners.quantized",
    "lamda_param_groups": ".optim",
    "loss_ratio": ".stall",
}

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

_peft_hook.install()


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (with PEFT registration); a submodule, as after the old eager import."""
    if name in _LAZY:
        _peft_hook.register_methods()  # any way in registers, even if the import hook could not
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "register":  # the old ``from ._peft_registry import register`` of this module
        return importlib.import_module("._peft_registry", __name__).register
    # ``lamda_peft.optim`` without ``import lamda_peft.optim`` worked when this module imported everything
    # (not the deprecated old paths, which warn when imported: only an import statement gets them)
    full = f"{__name__}.{name}"
    if not name.startswith("__") and full not in _peft_hook.SHIMS and importlib.util.find_spec(full):
        return importlib.import_module(full)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
