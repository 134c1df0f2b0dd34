"""Training memory: measure one real step, or estimate it from shapes without running anything.

What a training step holds, in bytes (the "accounted" total, method.md section 4):

    saved       tensors autograd keeps for backward, each storage counted once, parameters and buffers excluded
    parameters  every parameter of the model (frozen and trainable; a bitsandbytes weight counts its packed bytes
                and its quantization state)
    buffers     every buffer (LaMDA's frozen A and B0S0 live here)
    gradients   one tensor per trainable parameter
    optimizer   AdamW: exp_avg and exp_avg_sq per trainable parameter (+ a scalar step counter each)

The package, one concept per module:

    measure.py     ``measure_training_step``: one forward/backward/optimizer step, figures read off the tensors
    formulas.py    parameter counts and the per-architecture saved-bytes formulas (LLaMA, BERT, the adapter path)
    meta_trace.py  the architecture on the meta device: adapted modules and their inputs, a traced fallback
    estimate.py    ``estimate_training_step``: the same figures from the config alone (no weights, no compute)

The tests hold the estimate within 10% of the measurement on SmolLM2 and MiniLM.
"""

from .estimate import PreparedModel, estimate_training_step, prepare_model
from .formulas import (
    METHODS,
    AdaptedModule,
    adapter_saved_bytes,
    adapter_trainable_parameters,
    bert_saved_bytes,
    lamda_average_updates,
    llama_saved_bytes,
)
from .measure import MB, MemoryReport, SavedTensorLog, default_loss, measure_training_step
from .meta_trace import adapted_modules, meta_model, traced_saved_bytes

__all__ = [
    "MB", "METHODS", "AdaptedModule", "MemoryReport", "PreparedModel", "SavedTensorLog", "adapted_modules",
    "adapter_saved_bytes", "adapter_trainable_parameters", "bert_saved_bytes", "default_loss",
    "estimate_training_step", "lamda_average_updates", "llama_saved_bytes", "measure_training_step", "meta_model",
    "prepare_model", "traced_saved_bytes",
]
