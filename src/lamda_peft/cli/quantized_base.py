"""``lamda-peft train --load-in-4bit`` / ``--load-in-8bit``: the base model in 4-bit NF4 (QLoRA-style) or 8-bit
(LLM.int8) with bitsandbytes, the adapter in full precision.

Kept apart from train.py so the option is three lines there: the argument, the check, the loader. Light (torch is
imported by the loaders only): ``train``'s and ``eval``'s option checks use it before anything heavy is imported.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional

from . import UsageError

if TYPE_CHECKING:
    import torch

HELP = ("load the base model's linear layers in 4-bit NF4 with bitsandbytes (QLoRA-style; needs "
        "pip install 'lamda-peft[quant]'); the adapter trains in the compute dtype, the base stays 4-bit")
HELP_8BIT = ("load the base model's linear layers in 8-bit (LLM.int8) with bitsandbytes (needs pip install "
             "'lamda-peft[quant]'); the adapter trains in full precision, the base stays 8-bit")
DESCRIPTION = {4: "4-bit NF4", 8: "8-bit (LLM.int8)"}


def add_argument(group: argparse._ArgumentGroup) -> None:
    either = group.add_mutually_exclusive_group()
    either.add_argument("--load-in-4bit", action="store_true", help=HELP)
    either.add_argument("--load-in-8bit", action="store_true", help=HELP_8BIT)


def quantized_bits(args: argparse.Namespace) -> Optional[int]:
    """4 or 8 when the base is to be loaded quantized, else None."""
    if getattr(args, "load_in_4bit", False):
        return 4
    return 8 if getattr(args, "load_in_8bit", False) else None


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse what cannot work before anything is written; returns the entry for the run's config (empty if off)."""
    bits = quantized_bits(args)
    if bits is None:
        return {}
    flag = f"--load-in-{bits}bit"
    if args.method == "full":
        raise UsageError(f"{flag} cannot train --method full (a {bits}-bit weight has no gradient); "
                         "use an adapter method, e.g. --method lamda")
    require_bitsandbytes(flag)
    return {f"load_in_{bits}bit": True}  # in the run's config: ``eval`` loads the base as it was trained


def require_bitsandbytes(flag: str = "--load-in-4bit") -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} needs bitsandbytes: pip install 'lamda-peft[quant]'") from None


def nf4_config(compute_dtype: torch.dtype | None = None):
    """transformers' ``BitsAndBytesConfig`` for an NF4 base: bf16 compute on a GPU that has it, else float32."""
    import torch
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def quantization_config(bits: int):
    """transformers' ``BitsAndBytesConfig`` for a ``bits``-bit base (4: NF4, 8: LLM.int8)."""
    from transformers import BitsAndBytesConfig

    return nf4_config() if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)


def load_base(args: argparse.Namespace, path: str, task: str, num_labels: int, dtype: Optional[torch.dtype] = None):
    """``cli.eval.load_base``, with the quantization ``--load-in-4bit`` / ``--load-in-8bit`` ask for (``dtype``
    None: float32)."""
    import torch

    from .eval import load_base as load_full_precision

    dtype = torch.float32 if dtype is None else dtype
    bits = quantized_bits(args)
    if bits is None:
        return load_full_precision(path, task, num_labels, dtype=dtype)
    return load_quantized(path, task, num_labels, bits, dtype=dtype)


def load_quantized(path: str, task: str, num_labels: int, bits: int, dtype: Optional[torch.dtype] = None,
                   **kwargs: Any):
    """``cli.eval.load_base`` with the linear layers in ``bits``-bit (``kwargs`` go to it; ``dtype`` None:
    float32)."""
    import torch

    from ..tuners.quantized import keep_training_layout
    from .eval import load_base as load_full_precision

    dtype = torch.float32 if dtype is None else dtype
    model, tokenizer = load_full_precision(path, task, num_labels, dtype=dtype,
                                           quantization_config=quantization_config(bits), **kwargs)
    keep_training_layout(model)  # 4-bit: no CPU inference repack by bitsandbytes, even before the adapter is added
    return model, tokenizer


def load_4bit(path: str, task: str, num_labels: int, dtype: Optional[torch.dtype] = None, **kwargs: Any):
    """:func:`load_quantized` in 4-bit NF4 (the examples use it; ``dtype`` None: float32)."""
    return load_quantized(path, task, num_labels, 4, dtype=dtype, **kwargs)
