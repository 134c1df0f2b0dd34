"""Measure one real training step: what autograd saves, parameters, buffers, gradients, optimizer state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..tuners.quantized import quantization_state_bytes

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

