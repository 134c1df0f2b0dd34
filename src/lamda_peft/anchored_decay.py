"""Weight decay that pulls LaMDA toward the pretrained model, not toward zero.

Weight decay shrinks every parameter toward 0. For LoRA and LoRA-FA that is the pretrained model (their delta ``B A``
is 0 at ``B = 0``). For LaMDA it is not: with S and B at 0 the delta ``s (B S - B0S0) A`` becomes ``-s B0S0 A``, minus
W0's top-r part, so a run whose task gradient is zero drifts away from the base model (AdamW, lr 1e-3, weight decay
0.1, 300 steps: the logits of a tiny LLaMA moved by several percent).

Here decay pulls each parameter toward an *anchor* where the delta is zero:

    S  ->  S0 (I, or 0 for init="spectral_zero")          B  ->  B0S0

For ``init`` "spectral", "activations", "gradient" and "random" (S0 = I, B0 = B0S0) this is exactly the initial (S0,
B0), so the delta B S - B0S0 stays 0 all along a zero-gradient run. For "spectral_zero" (S0 = 0, B0S0 = 0) S stays at
0, where the delta is 0 whatever B is, and B decays toward 0 (its initial SVD factor is not stored in an adapter file,
and an anchor must be the same after a reload). An ``init_weights=False`` start keeps these anchors, i.e. decay pulls
it toward the pretrained model. LoRA-FA's B keeps plain decay (its anchor is 0).

How: optimizer step hooks (:func:`anchor_weight_decay`), exact for both kinds of decay a torch optimizer applies:

    decoupled (AdamW; Adam, NAdam, RAdam with decoupled_weight_decay=True):
        the optimizer computes p (1 - lr wd) - update; after the step  p += lr wd anchor
        ->  p - lr wd (p - anchor) - update
    coupled L2 (SGD, Adam, Adagrad, RMSprop, Adamax, ...):
        before the step  grad -= wd anchor  (put back after)  ->  the optimizer sees grad + wd (p - anchor)

Frozen columns of B are left alone (``lamda_peft.freezing`` keeps them bit-identical). ``attach_freezing`` and
``LamdaCallback`` install the hooks, so the Trainer (its own AdamW included), the CLI and a plain loop get them.
Under DeepSpeed ZeRO (a torch AdamW inside) the correction goes to each rank's slice of the master and working
copies (``anchor_zero_weight_decay``). An optimizer whose decay this module does not know (bitsandbytes' 8-bit
AdamW, Adafactor, DeepSpeed's own fused optimizers, coupled decay under ZeRO), or a sharded S/B (FSDP2), gets a
warning instead: there the decay still pulls toward zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .integrations import zero_optimizer
from .tuners.lamda.layer import LamdaLayer

#: torch optimizers that add ``wd * p`` to the gradient (decay coupled to the update), unless the group says
#: ``decoupled_weight_decay=True``
COUPLED_DECAY = (torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adamax,
                 torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD)


@dataclass
class _Anchored:
    """One trainable LaMDA factor and the value its decay pulls it toward."""

    param: nn.Parameter
    anchor: Callable[[], torch.Tensor]  # read at each step: a deferred init may fill B0S0 after the hooks are set
    frozen: Callable[[], Optional[slice]]  # B's columns frozen now (left untouched), None for S

    def free_columns(self) -> list[slice]:
        """The column ranges the decay acts on: all, or those outside the frozen (contiguous) block."""
        frozen = self.frozen()
        if frozen is None:
            return [slice(None)]
        r = _full_shape(self.param)[-1]
        start, stop, _ = frozen.indices(r)
        return [s for s in (slice(0, start), slice(stop, r)) if s.stop > s.start]


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape (a ZeRO-3 partitioned parameter is empty; ``ds_shape`` holds it)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def anchored_factors(model: nn.Module) -> dict[int, _Anchored]:
    """{id(parameter): _Anchored} for every LaMDA S and B in ``model`` (found through the layers' containers)."""
    configs = next((m.peft_config for m in model.modules() if isinstance(getattr(m, "peft_config", None), dict)), {})
    found: dict[int, _Anchored] = {}
    for module in model.modules():
        if not isinstance(module, LamdaLayer):
            continue
        for adapter, S in module.lamda_S.items():
            zero = getattr(configs.get(adapter), "init", None) == "spectral_zero"
            found[id(S)] = _Anchored(S, _constant_like(S, zero), lambda: None)
        for adapter, B in module.lamda_B.items():
            found[id(B)] = _Anchored(B, _buffer(module, adapter), _frozen_columns(module, adapter))
    return found


def _constant_like(S: torch.Tensor, zero: bool) -> Callable[[], torch.Tensor]:
    if zero:
        return lambda: torch.zeros(_full_shape(S), dtype=S.dtype, device=S.device)
    return lambda: torch.eye(_full_shape(S)[0], dtype=S.dtype, device=S.device)


def _buffer(layer: nn.Module, adapter: str) -> Callable[[], torch.Tensor]:
    return lambda: layer.lamda_B0S0[adapter]


def _frozen_columns(layer: nn.Module, adapter: str) -> Callable[[], Optional[slice]]:
    return lambda: layer.b_frozen_columns.get(adapter)


def _decay_kind(optimizer: torch.optim.Optimizer, group: dict) -> Optional[str]:
    """"decoupled", "coupled", or None for an optimizer whose decay is not known here."""
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay"):
        return "decoupled"
    if isinstance(optimizer, COUPLED_DECAY):
        return "coupled"
    return None


class AnchoredDecay:
    """The hooks of :func:`anchor_weight_decay` on one optimizer; ``remove()`` takes them off."""

    def __init__(self, optimizer: torch.optim.Optimizer, factors: dict[int, _Anchored]) -> None:
        self.optimizer = optimizer
        self.factors = factors
        self._restore: list[tuple[torch.Tensor, slice, torch.Tensor]] = []
        self._handles: list[RemovableHandle] = [optimizer.register_step_pre_hook(self._before_step),
                                                optimizer.register_step_post_hook(self._after_step)]

    def _decayed(self, kind: str):
        """(factor, lr, wd) for each anchored factor with a gradient in a group with decay of ``kind``."""
        for group in self.optimizer.param_groups:
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            if wd == 0.0 or _decay_kind(self.optimizer, group) != kind:
                continue
            for param in group["params"]:
                factor = self.factors.get(id(param))
                if factor is not None and param.grad is not None:  # no grad: the optimizer skips it, decay too
                    yield factor, float(group["lr"]), wd

    @torch.no_grad()
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for factor, _, wd in self._decayed("coupled"):
            anchor, grad = factor.anchor(), factor.param.grad
            for columns in factor.free_columns():
                self._restore.append((grad, columns, grad[..., columns].clone()))
                grad[..., columns] -= wd * anchor[..., columns].to(grad.dtype)

    @torch.no_grad()
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for grad, columns, original in self._restore:  # the caller's gradient as it was, bit for bit
            grad[..., columns] = original
        self._restore.clear()
        for factor, lr, wd in self._decayed("decoupled"):
            anchor, param = factor.anchor(), factor.param
            for columns in factor.free_columns():
                param[..., columns] += (lr * wd) * anchor[..., columns].to(param.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ZeroAnchoredDecay:
    """Anchored decoupled decay on DeepSpeed ZeRO's optimizer: after its step, ``+ lr wd anchor`` on this rank's
    slice of each anchored factor's master and working copy (``zero_optimizer.add_on_columns``)."""

    def __init__(self, zero: Any, factors: dict[int, _Anchored]) -> None:
        self.decayed = []
        for factor in factors.values():
            group = zero_optimizer.group_of(zero, factor.param)
            if group is not None and float(group.get("weight_decay", 0.0) or 0.0) > 0:
                self.decayed.append((factor, group))
        self._hooks = zero_optimizer.register_step_hooks(zero, lambda *a: None, self._after_step)

    def _after_step(self, zero: Any, args: Any, kwargs: Any) -> None:
        for factor, group in self.decayed:
            scale = float(group["lr"]) * float(group["weight_decay"])
            for columns in factor.free_columns():
                zero_optimizer.add_on_columns(factor.param, factor.anchor(), scale, columns)

    def remove(self) -> None:
        self._hooks.remove()


def anchor_zero_weight_decay(model: nn.Module, zero: Any) -> Optional[ZeroAnchoredDecay]:
    """:func:`anchor_weight_decay` for DeepSpeed ZeRO's optimizer (stages 1-3) around a torch AdamW/Adam/SGD."""
    factors = anchored_factors(model)
    inner = zero.optimizer
    decayed = [g for g in inner.param_groups if float(g.get("weight_decay", 0.0) or 0.0) > 0]
    if not factors or not decayed:
        return None
    kinds = {_decay_kind(inner, g) for g in decayed}
    if kinds != {"decoupled"}:
        warn_unanchored(f"under DeepSpeed ZeRO only a decoupled decay (AdamW) is re-anchored, not that of "
                        f"{type(inner).__name__}")
        return None
    return ZeroAnchoredDecay(zero, factors)


def anchor_weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[AnchoredDecay]:
    """Make ``optimizer``'s weight decay pull LaMDA's S toward I and B toward B0S0 (the pretrained model).

    Returns the hooks (``.remove()``), or None when there is nothing to anchor: no LaMDA factor is decayed. Warns,
    and leaves the decay as it is, for an optimizer or a parameter layout it cannot handle exactly.
    """
    factors = anchored_factors(model)
    decayed = [(group, p) for group in optimizer.param_groups if float(group.get("weight_decay", 0.0) or 0.0) > 0
               for p in group["params"] if id(p) in factors]
    if not decayed:
        return None
    unknown = {type(optimizer).__name__ for group, _ in decayed if _decay_kind(optimizer, group) is None}
    sharded = [p for _, p in decayed if callable(getattr(p, "to_local", None))]
    if unknown or sharded:
        warn_unanchored(f"the optimizer {', '.join(sorted(unknown))} applies weight decay in a way lamda_peft does "
                        "not know" if unknown else "S and B are sharded (FSDP2)")
        return None
    return AnchoredDecay(optimizer, factors)


def warn_unanchored(reason: str) -> None:
    warnings.warn(
        f"weight decay on LaMDA's S and B pulls them toward 0, which moves the model away from the pretrained one, and "
        f"cannot be re-anchored here: {reason}. Use torch.optim.AdamW, or give the LaMDA groups weight_decay=0 "
        "(lamda_param_groups(..., weight_decay=0)).", stacklevel=3)
