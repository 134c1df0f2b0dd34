"""Training memory: measure one real step, or estimate it from shapes without running anything.

What a training step holds, in bytes (the "accounted" total, method.md section 4):

    saved       tensors autograd keeps for backward, each storage counted once, parameters and buffers excluded
    parameters  every parameter of the model (frozen and trainable; a bitsandbytes weight counts its packed bytes
                and its quantization state)
    buffers     every buffer (LaMDA's frozen A and B0S0 live here)
    gradients   one tensor per trainable parameter
    optimizer   AdamW: exp_avg and exp_avg_sq per trainable parameter (+ a scalar step counter each)

``measure_training_step`` runs one forward/backward/optimizer step and reads these figures off the tensors;
``estimate_training_step`` predicts them from the model's config (on the meta device, no weights) with the
per-architecture formulas below. The tests hold the estimate within 10% of the measurement on SmolLM2 and MiniLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .freezing import freeze_count
from .tuners.quantized import quantization_state_bytes

MB = 10**6


@dataclass
class MemoryReport:
    """Bytes held by one training step (see the module docstring); ``accounted`` is their sum."""

    saved_bytes: int
    parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    trainable_parameters: int
    #: part of ``saved_bytes`` on the adapter path (estimates only; the measurement cannot attribute it)
    adapter_saved_bytes: Optional[int] = None
    #: CUDA peak (``torch.cuda.max_memory_allocated``) when the measured step ran on a GPU
    cuda_peak_bytes: Optional[int] = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def accounted_bytes(self) -> int:
        return self.saved_bytes + self.parameter_bytes + self.buffer_bytes + self.gradient_bytes + self.optimizer_state_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accounted_bytes"] = self.accounted_bytes
        return out


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


class SavedTensorLog:
    """Context manager recording what autograd saves for backward, one entry per storage.

    Storages of ``exclude`` (the model's parameters and buffers) are skipped. A saved tensor keeps its storage
    alive until backward, so a data pointer cannot be reused by another saved tensor within one forward.
    ``entries`` holds (shape, dtype, storage bytes) for calibration and debugging.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_storage_key(t) for t in exclude if t.numel() > 0}
        self.seen: set[tuple[str, int]] = set()
        self.entries: list[tuple[tuple[int, ...], torch.dtype, int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.entries)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta" or t.numel() == 0:
            return t
        key = _storage_key(t)
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.entries.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    def __enter__(self) -> "SavedTensorLog":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def default_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss``: a batch with ``labels`` gives the model's own loss."""
    return model(**batch).loss


def measure_training_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = default_loss,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> MemoryReport:
    """Run one real training step (forward, backward, optimizer step) and account its memory.

    The model's trainable parameters are updated (it is a real step). ``optimizer`` overrides ``optimizer_cls``
    (e.g. PEFT's LoRA-FA optimizer); without trainable parameters (the floor: make ``inputs_embeds`` require grad
    in ``loss_fn``) no optimizer runs.
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.grad = None
    cuda = any(p.is_cuda for p in params)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with SavedTensorLog(exclude=params + buffers) as log:
        loss = loss_fn(model, batch)
    loss.backward()
    gradient_bytes = _nbytes(p.grad for p in trainable if p.grad is not None)
    state_bytes = 0
    if trainable or optimizer is not None:
        opt = optimizer if optimizer is not None else optimizer_cls(trainable)
        opt.step()
        state_bytes = sum(_nbytes(v for v in s.values() if torch.is_tensor(v)) for s in opt.state.values())
        opt.zero_grad(set_to_none=True)
    return MemoryReport(
        saved_bytes=log.total_bytes,
        parameter_bytes=_nbytes(params) + quantization_state_bytes(model),  # a 4-bit weight: packed + state
        buffer_bytes=_nbytes(buffers),
        gradient_bytes=gradient_bytes,
        optimizer_state_bytes=state_bytes,
        trainable_parameters=sum(p.numel() for p in trainable),
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        details={"saved_tensors": len(log.entries), "loss": float(loss.detach())},
    )


# --------------------------------------------------------------------------------------------------------------
# Parameter counts (method.md sections 1-3 and 3.2)
# --------------------------------------------------------------------------------------------------------------
METHODS = ("floor", "lora", "pissa", "lorafa", "lamda", "lamda_frozen")


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
    with k(t) = min(r, floor(r t / (freeze_ratio T))) frozen columns of B (``freezing.freeze_count``)."""
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


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by views, defined for meta tensors too


def traced_saved_bytes(meta_model: nn.Module, batch_inputs: dict[str, torch.Tensor]) -> int:
    """Bytes saved for backward by a forward on the meta device (no data, no compute), inputs needing grad.

    The generic fallback for architectures without a formula. Meta kernels pick the math attention path, so for
    SDPA models this is an upper bound (SmolLM2: 6% above the CPU measurement).
    """
    params = list(meta_model.parameters()) + list(meta_model.buffers())
    excluded = {_storage_id(t) for t in params}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_id(t)
        if key not in excluded and key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    # the floor's convention: gradients flow back to the embeddings' output (encoder and decoder alike)
    hook = meta_model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.requires_grad_(True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            meta_model(**batch_inputs)
    finally:
        hook.remove()
    return total[0]


def _task(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    names = [type(model_or_config).__name__] if isinstance(model_or_config, nn.Module) else []
    names += list(getattr(config, "architectures", None) or [])
    for name in names:
        if name.endswith("ForCausalLM"):
            return "causal_lm"
        if name.endswith("ForSequenceClassification"):
            return "seq_cls"
        if name.endswith("ForConditionalGeneration"):
            return "seq2seq_lm"
    return "causal_lm" if _family(config) == "llama" else "base"


def meta_model(model_or_config, dtype: torch.dtype = torch.float32, task: Optional[str] = None) -> nn.Module:
    """The architecture of ``model_or_config`` (a transformers model or config) on the meta device: no weights."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config = getattr(model_or_config, "config", model_or_config)
    task = task or _task(model_or_config)
    with torch.device("meta"):
        if isinstance(model_or_config, nn.Module):
            model = type(model_or_config)(config)
        else:
            cls = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification,
                   "seq2seq_lm": AutoModelForSeq2SeqLM}.get(task, AutoModel)
            model = cls.from_config(config)
    return model.to(dtype).train()


def adapted_modules(meta: nn.Module, batch: int, seq: int, r: int = 8, targets: Union[str, list[str]] = "all-linear",
                    rank_pattern: Optional[dict[str, int]] = None, task: str = "causal_lm") -> tuple[list[AdaptedModule], nn.Module]:
    """The modules PEFT would adapt (same target matching as LoRA, LaMDA and LoRA-FA), each with its input.

    Wraps the meta model with a PEFT LoRA (on the meta device: free) and runs one meta forward with hooks, so
    the token count and the input tensor of each module come from the real forward code, for any architecture.
    Returns the modules and the wrapped meta model.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    task_type = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM"}.get(task)
    no_match = f"target_modules={targets!r} matches no module of this model; name some of its Linear layers"
    try:
        peft_model = get_peft_model(meta, LoraConfig(r=r, target_modules=targets, rank_pattern=rank_pattern or {},
                                                     task_type=task_type))
    except ValueError as err:
        raise ValueError(f"{no_match} ({err})") from None
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError(no_match)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0])  # kept alive, so ids are unique for the whole forward
        return hook

    hooks = [m.register_forward_pre_hook(keep_input(name)) for name, m in layers.items()]
    already_saved = _inputs_saved_by_attention(peft_model)
    try:
        with torch.no_grad():
            peft_model(**_meta_batch(peft_model, batch, seq, task))
    except RuntimeError:
        # Some forwards read data (``.item()`` on a mask: DeBERTa, BART): then every module is taken to read
        # its own batch x seq rows (no sharing), as an encoder-decoder with equal lengths would.
        inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    prefix = "base_model.model."
    e = peft_model.get_input_embeddings().weight.element_size()
    out = []
    for name, m in layers.items():
        x = inputs.get(name)
        tokens = x.numel() // x.shape[-1] if x is not None else batch * seq
        out.append(AdaptedModule(
            name=name.removeprefix(prefix), d_in=m.in_features, d_out=m.out_features, r=m.r["default"], tokens=tokens,
            input_id=id(x) if x is not None else id(m), input_already_saved=id(m) in already_saved,
            input_bytes=x.untyped_storage().nbytes() if x is not None else tokens * m.in_features * e))
    return out, peft_model


def _inputs_saved_by_attention(model: nn.Module) -> set[int]:
    """Modules whose input the frozen model keeps anyway: o_proj of LLaMA-style SDPA attention reads the
    attention output, which SDPA saves for its own backward (checked against autograd on CPU)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention
    except ImportError:  # pragma: no cover
        return set()
    return {id(m.o_proj) for m in model.modules() if isinstance(m, LlamaAttention)}


def _meta_batch(model: nn.Module, batch: int, seq: int, task: str) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    out = {"input_ids": ids}
    if task == "seq_cls":
        out["labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    elif task in ("causal_lm", "seq2seq_lm"):
        out["labels"] = ids
    return out


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


@dataclass
class PreparedModel:
    """What every method's estimate shares: the base model's bytes and the adapted modules (built once)."""

    parameter_bytes: int
    buffer_bytes: int
    modules: list[AdaptedModule]
    head_parameters: list[torch.Tensor]  # trainable copies of modules_to_save (a classification head)


def prepare_model(model_or_config, batch: int, seq: int, r: int = 8, targets: Union[str, list[str]] = "all-linear",
                  dtype: torch.dtype = torch.float32, rank_pattern: Optional[dict[str, int]] = None,
                  task: Optional[str] = None) -> PreparedModel:
    """Build the meta model once and find its adapted modules; pass the result to ``estimate_training_step``."""
    task = task or _task(model_or_config)
    meta = meta_model(model_or_config, dtype=dtype, task=task)
    param_bytes, buffer_bytes = _nbytes(meta.parameters()), _nbytes(meta.buffers())
    modules, peft_model = adapted_modules(meta, batch, seq, r, targets, rank_pattern, task)
    return PreparedModel(param_bytes, buffer_bytes, modules, _modules_to_save_parameters(peft_model))


def estimate_training_step(
    model_or_config,
    batch: int,
    seq: int,
    method: str = "lamda",
    r: int = 8,
    targets: Union[str, list[str]] = "all-linear",
    dtype: torch.dtype = torch.float32,
    rank_pattern: Optional[dict[str, int]] = None,
    task: Optional[str] = None,
    device: str = "cpu",
    prepared: Optional["PreparedModel"] = None,
) -> MemoryReport:
    """Estimate what ``measure_training_step`` would report, without weights or compute.

    ``model_or_config``: a transformers model (only its class and config are used) or a ``PretrainedConfig``.
    ``method``: floor (no adapter, gradients flow to the input embeddings), lora, pissa, lora_frozen_a,
    lorafa, lamda (B training), lamda_frozen (B frozen). LaMDA++ is lamda with a ``rank_pattern``.
    ``device``: where the step would run ("cpu" or "cuda"; dropout masks and CPU attention differ).
    The model's own saved activations use the LLaMA or BERT formula, or a meta-device trace for other families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    task = task or _task(model_or_config)
    prepared = prepared or prepare_model(model_or_config, batch, seq, r, targets, dtype, rank_pattern, task)
    modules, family = prepared.modules, _family(config)
    adapter = method != "floor"
    e, f = _dtype_size(dtype), 4

    # the model's own saved activations: inputs need a gradient only for the floor
    if family == "llama":
        model_saved = llama_saved_bytes(config, batch, seq, dtype, inputs_require_grad=not adapter, head=task)
    elif family == "bert":
        model_saved = bert_saved_bytes(config, batch, seq, dtype, inputs_require_grad=not adapter, head=task,
                                       classifier_trainable=adapter, device=device)
    else:
        try:
            model_saved = traced_saved_bytes(meta_model(model_or_config, dtype=dtype, task=task).requires_grad_(False),
                                             _meta_batch(None, batch, seq, task))
        except RuntimeError:  # the forward reads data (see adapted_modules): no estimate for the frozen model
            model_saved = None
    adapter_saved = adapter_saved_bytes(method, modules, dtype)

    # parameters and buffers of the adapters; trainable tensors
    method_params = "lora" if method == "lora_frozen_a" else method
    trainable = 0
    adapter_params = adapter_buffers = n_trainable_tensors = 0
    for m in modules if adapter else []:
        if method_params in ("lora", "pissa"):
            adapter_params += m.r * (m.d_in + m.d_out) * f
        elif method_params == "lorafa":
            adapter_params += m.d_out * m.r * f
            adapter_buffers += m.r * m.d_in * e
        else:  # lamda, lamda_frozen: S and B parameters; A and B0S0 buffers
            adapter_params += (m.r * m.r + m.d_out * m.r) * f
            adapter_buffers += m.r * m.d_in * e + m.d_out * m.r * f
        counted = "lorafa" if method == "lora_frozen_a" else method
        trainable += adapter_trainable_parameters(counted, m.d_in, m.d_out, m.r)
        n_trainable_tensors += {"lora": 2, "pissa": 2, "lamda": 2}.get(counted, 1)
    extra_params = prepared.head_parameters if adapter else []
    trainable_bytes = trainable * f + _nbytes(extra_params)
    n_trainable_tensors += len(extra_params)
    return MemoryReport(
        saved_bytes=(model_saved or 0) + adapter_saved,
        parameter_bytes=prepared.parameter_bytes + adapter_params + _nbytes(extra_params),
        buffer_bytes=prepared.buffer_bytes + adapter_buffers,
        gradient_bytes=trainable_bytes,
        optimizer_state_bytes=2 * trainable_bytes + 4 * n_trainable_tensors if adapter else 0,
        trainable_parameters=trainable + sum(p.numel() for p in extra_params),
        adapter_saved_bytes=adapter_saved,
        details={"model_saved_bytes": model_saved, "adapted_modules": len(modules), "family": family, "task": task},
    )


def _modules_to_save_parameters(peft_model: nn.Module) -> list[torch.Tensor]:
    """Parameters of the trainable copies PEFT makes for modules_to_save (e.g. a classification head)."""
    from peft.utils.other import ModulesToSaveWrapper

    return [p for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)
            for p in m.modules_to_save.parameters()]
