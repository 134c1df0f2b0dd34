"""Per-architecture formulas: parameter counts (method.md sections 1-3, 3.2) and the bytes a step saves for backward
(LLaMA, BERT and the adapter path), from shapes alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule import freeze_count

METHODS = ("floor", "lora", "pissa", "lorafa", "lamda", "lamda_frozen")
NF4_BLOCKSIZE = 64


def nf4_weight_bytes(numel: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = False) -> int:
    """Bytes of one weight stored by bitsandbytes in 4-bit NF4: the packed values (two per byte), one absmax per block
    of ``blocksize`` (float32; with double quantization uint8 plus one float32 per 256 blocks and a 256-entry code),
    and the 16-entry NF4 code (float32)."""
    blocks = -(-numel // blocksize)
    absmax = blocks + 4 * -(-blocks // 256) + 256 * 4 if double_quant else 4 * blocks
    return -(-numel // 2) + absmax + 16 * 4


def adapter_trainable_parameters(method: str, d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one adapted module: LoRA/PiSSA r(d_in + d_out), LoRA-FA r d_out,
    LaMDA r^2 + r d_out while B trains, r^2 once B is frozen."""
    if method in ("lora", "pissa"):
        return r * (d_in + d_out)
    if method == "lorafa":
        return r * d_out
    if method == "lamda":
        return r * r + r * d_out
    if method == "lamda_frozen":
        return r * r
    if method == "floor":
        return 0
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def lamda_average_updates(d_out: int, r: int, freeze_ratio: float = 0.3, total_steps: int = 1000) -> float:
    """Parameter updates per step averaged over a run of T steps: mean over t of r^2 + (r - k(t)) d_out,
    with k(t) = min(r, floor(r t / (freeze_ratio T))) frozen columns of B (``schedule.freeze_count``)."""
    trainable_cols = sum(r - freeze_count(t, total_steps, r, freeze_ratio) for t in range(total_steps))
    return r * r + d_out * trainable_cols / total_steps


# --------------------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptedModule:
    """One module an adapter method would wrap: its shape, rank, and the input it reads in a forward pass.

    ``tokens`` is the number of rows of its input (batch x seq for most, batch for a pooler);
    ``input_id`` groups modules that read the very same tensor (q/k/v, gate/up), whose input LoRA keeps once.
    """

    name: str
    d_in: int
    d_out: int
    r: int
    tokens: int
    input_id: int
    input_bytes: int  # storage bytes of the input (a slice such as BERT's pooler input keeps its whole storage)
    input_already_saved: bool  # the frozen model itself keeps this input (e.g. the SDPA output read by o_proj)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _family(config) -> str:
    if config.model_type in ("llama", "mistral", "qwen2"):
        return "llama"
    if config.model_type == "bert":
        return "bert"
    return "other"


def llama_saved_bytes(config, batch: int, seq: int, dtype: torch.dtype, inputs_require_grad: bool,
                      head: str = "causal_lm") -> int:
    """Bytes a LLaMA-style decoder saves for backward when gradients flow through it (weights frozen).

    Read off autograd's saved tensors (transformers 5, SDPA attention; exact on CPU): per layer
        2 RMSNorms: input upcast to fp32 (n h f) + rstd (n f)      [layer 0's first norm only if inputs need grad]
        attention:  rotated q (n h), k and v (n kv each), output (n h), logsumexp (n heads, fp32)
        MLP:        silu input, silu output and up output (3 n I)
    plus the final norm, RoPE cos/sin (seq x head_dim, twice, shared by all layers) and, for a causal LM head,
    the fp32 log-softmax of the logits (n V f) and the int64 labels. e = dtype size, f = 4.
    """
    n, e, f = batch * seq, _dtype_size(dtype), 4
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    norm = n * h * f + n * f
    attn = (2 * n * heads * head_dim + 2 * n * kv) * e + n * heads * f
    mlp = 3 * n * inter * e
    total = layers * (2 * norm + attn + mlp) + norm + 2 * seq * head_dim * e
    if not inputs_require_grad:
        total -= norm  # layer 0's input norm sees an input that needs no gradient
    if head == "causal_lm":
        total += n * config.vocab_size * f + n * 8 + f
    return total


def bert_saved_bytes(config, batch: int, seq: int, dtype: torch.dtype, inputs_require_grad: bool,
                     head: str = "seq_cls", classifier_trainable: bool = True, device: str = "cpu") -> int:
    """Bytes a BERT encoder saves for backward in training mode (dropout on), weights frozen.

    Read off autograd's saved tensors (transformers 5, CPU): per layer
        attention:  with attention dropout SDPA takes the math path: q, k, v (3 n h) and the softmax output,
                    dropout mask and dropped probabilities (3 batch heads seq^2), in fp32 on CPU
        2 x (dropout mask (n h) + LayerNorm input (n h) + mean and rstd (2 n))
        GELU input (n I)
    plus the embeddings' LayerNorm and dropout when the inputs need a gradient, and the pooler/classifier head.
    On CPU a dropout mask has the input's dtype; on CUDA it is one byte per element.
    """
    n, e = batch * seq, _dtype_size(dtype)
    h, inter, layers, heads = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads
    mask = 1 if device == "cuda" else e
    if config.attention_probs_dropout_prob > 0:
        a = 4 if device == "cpu" else e  # CPU's math SDPA computes half precision in fp32
        attn = 3 * n * h * a + 3 * batch * heads * seq * seq * a
    else:  # fused SDPA: q, k, v, output, logsumexp
        attn = 4 * n * h * e + n * heads * 4
    dropout = n * h * mask if config.hidden_dropout_prob > 0 else 0
    ln = n * h * e + 2 * n * e
    total = layers * (attn + 2 * (dropout + ln) + n * inter * e)
    if inputs_require_grad:
        total += ln + dropout
    if head == "seq_cls":
        pooled = batch * h * e
        total += pooled + (batch * h * mask if config.hidden_dropout_prob > 0 else 0)  # tanh output, dropout mask
        total += pooled if classifier_trainable else 0
        total += batch * getattr(config, "num_labels", 2) * 4 + batch * 8 + 4  # log-softmax, labels, loss
    return total



def adapter_saved_bytes(method: str, modules: list[AdaptedModule], dtype: torch.dtype) -> int:
    """Bytes the adapter path adds to what autograd saves (method.md section 4).

    lamda, lamda_frozen, lorafa (ours, delta form): x A^T only, n r in the compute dtype.
    lora / pissa (PEFT): x A^T (n r, fp32: PEFT keeps adapters in fp32) and the input x for A's gradient, once
    per input tensor shared by several modules, or, with a half-precision base, one fp32 copy per module (PEFT
    casts x to the adapter's dtype in each module).
    lora_frozen_a (PEFT LoRA with A frozen, as PEFT's LoRA-FA optimizer does): x A^T in fp32 only.
    """
    e, f = _dtype_size(dtype), 4
    if method == "floor":
        return 0
    if method in ("lamda", "lamda_frozen", "lorafa"):
        return sum(m.tokens * m.r * e for m in modules)
    xa = sum(m.tokens * m.r * f for m in modules)
    if method == "lora_frozen_a":
        return xa
    if method not in ("lora", "pissa"):
        raise ValueError(f"unknown method {method!r}")
    if e != f:
        return xa + sum(m.tokens * m.d_in * f for m in modules)
    distinct = {m.input_id: m.input_bytes for m in modules if not m.input_already_saved}
    return xa + sum(distinct.values())

