"""The model on the meta device: its architecture without weights, the modules PEFT would adapt with their inputs,
and a traced count of saved bytes for architectures without a formula."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .formulas import AdaptedModule, _family

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

