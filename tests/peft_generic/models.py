"""Offline stand-ins for the tiny Hub models PEFT's tests load (``hf-internal-testing/tiny-random-*`` and kin).

Each is built from a config with tiny sizes and a fixed seed, saved once under the lamda_peft cache, and passed to
PEFT's tests as a local folder whose name keeps the Hub name, so PEFT's own checks on the name ("GPT2LMHeadModel"
in model_id, "llama" in model_id.lower()) decide as they would for the Hub model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
)

from lamda_peft.apps.models import cache_dir

VOCAB = 128  # PEFT's inputs use token ids 1 and 2; special tokens sit at the end, out of their way
_LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
              pad_token_id=0)

_BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1)),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=64, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1)),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA)),
    "peft-internal-testing/tiny-random-BertForSequenceClassification": lambda: BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=64, num_labels=2)),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": lambda: LlamaForSequenceClassification(
        LlamaConfig(**_LLAMA, num_labels=2)),
}

DECODERS = [name for name in _BUILDERS if name.endswith(("CausalLM", "LMHeadModel"))]
SEQ_CLS = [name for name in _BUILDERS if "SequenceClassification" in name]


# test_config's PEFT_MODELS_TO_TEST: a LoRA adapter config on the Hub, read by every config class's from_pretrained
LORA_CONFIG_REPO = "peft-internal-testing/tiny-opt-lora-revision"


def local_path(hub_id: str) -> Path:
    """Where the stand-in for ``hub_id`` lives (built by ``build_all``), per transformers version."""
    root = cache_dir() / "peft-tests" / f"tiny-models-transformers-{transformers.__version__}"
    return root / hub_id.split("/")[-1]


def _lora_adapter_config(path: Path) -> None:
    """A stock LoRA adapter config for an OPT model, as the Hub repo holds (only adapter_config.json is read)."""
    from peft import LoraConfig

    config = LoraConfig(base_model_name_or_path=str(local_path(DECODERS[0])), target_modules=["q_proj", "v_proj"])
    config.save_pretrained(path)


def build_all() -> None:
    """Build and save every stand-in that is not in the cache yet (a second or so for all of them)."""
    builders = {hub_id: lambda path, build=build: build().save_pretrained(path) for hub_id, build in _BUILDERS.items()}
    builders[LORA_CONFIG_REPO] = _lora_adapter_config
    for hub_id, build in builders.items():
        path = local_path(hub_id)
        if path.is_dir():
            continue
        torch.manual_seed(0)
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        build(partial)
        try:
            os.replace(partial, path)  # atomic; fails if another process has just built it
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
