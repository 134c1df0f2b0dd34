"""Options for a memory-bound run: a chunked causal-LM loss and per-layer activation checkpointing.

Where the floor's memory goes (SmolLM2, 4x256, fp32; docs/memory.md): the fp32 log-softmax of the logits is n x V x 4
bytes (n = batch x seq, V = 49152: 201 MB of 1102 MB), and every decoder layer keeps about 2 n h fp32 (norms),
4 n h (attention) and 3 n I (MLP). Both options trade compute for that memory and leave the loss and the gradients
unchanged (up to float rounding):

* ``chunked_causal_lm_loss``: lm_head + cross-entropy run per chunk of ``chunk_size`` tokens under checkpointing,
  so only the final hidden states (n x h) are kept, never the n x V logits; each chunk's logits are recomputed in
  backward.
* ``enable_layer_checkpointing``: each decoder layer keeps only its input (n x h) and recomputes its interior in
  backward (transformers' non-reentrant gradient checkpointing, which runs our custom autograd path unchanged).
  The adapters' own saved tensor, x A^T (n x r), is recomputed with the layer: it is r/h of the layer input
  the checkpoint keeps anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (chunk, V), fp32 as transformers' loss
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against ``labels`` without materialising all the logits.

    hidden (n, h), weight (V, h), labels (n,) with -100 for ignored positions. Each chunk is checkpointed, so
    backward keeps only ``hidden`` (already alive) and recomputes one (chunk, V) block of logits at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], weight, labels[start:end], use_reentrant=False)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``...ForCausalLM`` inside ``model`` (a PeftModel or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None, chunk_size: int = 1024) -> torch.Tensor:
    """The causal-LM loss of ``model(input_ids, labels=labels).loss`` (next-token, -100 ignored, mean over tokens),
    computed with ``chunked_cross_entropy`` from the decoder's last hidden states and the output embedding."""
    lm = _causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, h)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
    weight = lm.get_output_embeddings().weight
    return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1), chunk_size)


def enable_layer_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder/encoder layer (non-reentrant), keeping only each layer's input for backward."""
    lm = _causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing in transformers; "
                         "use the chunked loss alone")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False  # a KV cache is useless in training and incompatible with checkpointing
    return model
