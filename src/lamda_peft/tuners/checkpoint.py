"""How a tuner knows that an adapter is about to be loaded, so that it never re-runs the decomposition.

PEFT loads an adapter in two steps: it builds the config with ``ConfigClass.from_pretrained`` and injects the
adapter (which, for a fresh adapter, is when the SVD runs), then it loads the saved weights into it. Our configs'
``from_pretrained`` marks the config (a plain attribute, not a dataclass field, so it is never written to JSON).
A layer built from a marked config allocates its factors but defers the init (``LowRankDeltaLayer._assign_factors``):
the checkpoint then fills A and B0S0, and the decomposition never runs. If nothing is loaded (``get_peft_model``
with a config read from disk), the deferred init runs on first use, so that path still gets a fresh init.
"""

from __future__ import annotations

from peft.config import PeftConfig

_MARK = "_lamda_peft_loading_from_checkpoint"


def mark_loaded_from_checkpoint(config: PeftConfig) -> PeftConfig:
    setattr(config, _MARK, True)
    return config


def is_loaded_from_checkpoint(config: PeftConfig) -> bool:
    return bool(getattr(config, _MARK, False))
