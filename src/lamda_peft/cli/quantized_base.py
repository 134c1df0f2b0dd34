"""``lamda-peft train --load-in-4bit``: the base model in 4-bit NF4 (QLoRA-style), the adapter in full precision.

Kept apart from train.py so the option is three lines there: the argument, the check, the loader.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..tuners.quantized import keep_training_layout
from . import UsageError

HELP = ("load the base model's linear layers in 4-bit NF4 with bitsandbytes (QLoRA-style; needs "
        "pip install 'lamda-peft[quant]'); the adapter trains in the compute dtype, the base stays 4-bit")


def add_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--load-in-4bit", action="store_true", help=HELP)


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse what cannot work before anything is written; returns the entry for the run's config (empty if off)."""
    if not getattr(args, "load_in_4bit", False):
        return {}
    if args.method == "full":
        raise UsageError("--load-in-4bit cannot train --method full (a 4-bit weight has no gradient); "
                         "use an adapter method, e.g. --method lamda")
    require_bitsandbytes()
    return {"load_in_4bit": True}  # in the run's config: ``eval`` loads the base as it was trained


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("--load-in-4bit needs bitsandbytes: pip install 'lamda-peft[quant]'") from None


def nf4_config(compute_dtype: torch.dtype | None = None):
    """transformers' ``BitsAndBytesConfig`` for an NF4 base: bf16 compute on a GPU that has it, else float32."""
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def load_base(args: argparse.Namespace, path: str, task: str, num_labels: int, dtype: torch.dtype = torch.float32):
    """``cli.eval.load_base``, with the 4-bit quantization when ``--load-in-4bit`` is given."""
    from .eval import load_base as load_full_precision

    if not getattr(args, "load_in_4bit", False):
        return load_full_precision(path, task, num_labels, dtype=dtype)
    return load_4bit(path, task, num_labels, dtype=dtype)


def load_4bit(path: str, task: str, num_labels: int, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """``cli.eval.load_base`` with the linear layers in 4-bit NF4 (``kwargs`` go to it)."""
    from .eval import load_base as load_full_precision

    model, tokenizer = load_full_precision(path, task, num_labels, dtype=dtype, quantization_config=nf4_config(),
                                           **kwargs)
    keep_training_layout(model)  # no CPU inference repack by bitsandbytes, even before the adapter is added
    return model, tokenizer
