"""Gradual freezing of B (PMB), method.md section 3.2: exact, memory-saving, safe under DDP and FSDP2.

Schedule (``schedule.py``): after optimizer step t of T, the first

    k(t) = min(r, floor(r * t / (freeze_ratio * T)))

columns of every B (d_out, r) are frozen, in singular-value order (``largest_first``: columns 0..k-1, the largest
singular directions; ``smallest_first``: columns r-k..r-1). Every module follows its own r; all of them reach k = r
at the same step, t = ceil(freeze_ratio * T).

"Frozen" is enforced in three places, because zeroing a gradient is not enough (AdamW momentum and decoupled weight
decay keep moving a column whose gradient is zero):

1. backward: a hook on the B the forward uses zeroes the frozen columns' gradient (``LowRankDeltaLayer``), so
   gradient clipping and the DDP/FSDP reductions never see them;
2. before each optimizer step (``Optimizer.register_step_pre_hook``): the frozen columns' ``.grad`` is zeroed again
   (gradients produced outside our forward, e.g. by a user's own code);
3. after each optimizer step (``register_step_post_hook``): the frozen columns are copied back from a snapshot taken
   when they froze, so whatever the optimizer did (momentum, weight decay) they stay bit-identical.

Weight decay on the trainable columns pulls S toward I and B toward B0S0 (the pretrained model), not toward zero:
``anchored_decay.py``, whose hooks this module installs ahead of its own.

Under DeepSpeed ZeRO (stages 1-3) the optimizer holds flat fp32 partitions, not B: steps 2-3 act on ZeRO's step
and on the slice of B's master and working copies each rank owns (``integrations/zero_optimizer.py``).

Once k = r, B is *released* where that is safe (a single process, FSDP2): ``requires_grad=False`` made structural
through PEFT's ``frozen_peft_weight_names`` (``set_adapter``/``enable_adapter_layers`` re-apply it), ``.grad``
dropped, optimizer state dropped, snapshot dropped. ``LowRankDelta`` then computes no dB. Under DDP with default
settings (``find_unused_parameters=False``) the reducer was built with B trainable: flipping it would break the
reduction, so B stays allocated and masked (logged once).

The schedule advances on optimizer steps that ran: gradient accumulation does not advance it, and a step skipped by
a loss scaler (``GradScaler.step`` found inf/NaN and did not call ``optimizer.step``) does not either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Optional

import torch
from torch import nn

from .anchored_decay import anchor_weight_decay, anchor_zero_weight_decay
from .integrations import zero_optimizer
from .schedule import check_freeze_ratio, check_total_steps, freeze_count, freeze_end_step, frozen_columns
from .tuners.lamda.config import LamdaConfig
from .tuners.lamda.layer import LamdaLayer

logger = logging.getLogger(__name__)

Release = Literal["auto", "always", "never"]
RELEASE_CHOICES = ("auto", "always", "never")


def check_release(release: Any) -> str:
    if release not in RELEASE_CHOICES:
        raise ValueError(f"release={release!r} is not supported; choose one of {', '.join(map(repr, RELEASE_CHOICES))}")
    return release


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 shards B by rows, so every shard holds all r columns), else t."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _is_sharded(t: torch.Tensor) -> bool:
    return callable(getattr(t, "to_local", None))


def _innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``step`` really runs (accelerate's AcceleratedOptimizer wraps it as ``.optimizer``
    and only calls it when its loss scaler found no inf/NaN)."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}")
    return optimizer


def _unwrap_ddp(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    ddp = None
    while isinstance(model, nn.parallel.DistributedDataParallel):
        ddp, model = model, model.module
    return model, ddp


def _peft_configs(model: nn.Module) -> dict:
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            return configs
    raise TypeError(
        "attach_freezing needs a PEFT model with a LaMDA adapter (from peft.get_peft_model(model, LamdaConfig(...)) "
        f"or PeftModel.from_pretrained); got {type(model).__name__}, which has no peft_config"
    )


@dataclass
class _FrozenB:
    """One B (one adapter of one layer) under the schedule."""

    name: str
    layer: LamdaLayer
    adapter: str
    r: int
    freeze_ratio: Fraction
    order: str
    k: int = 0
    snapshot: Optional[torch.Tensor] = None  # (d_out local, r): frozen columns' values at their freezing step
    released: bool = False

    @property
    def B(self) -> nn.Parameter:
        return self.layer.lamda_B[self.adapter]

    def columns(self) -> slice:
        return frozen_columns(self.k, self.r, self.order)


class PMBFreezer:
    """Drives the freezing of every LaMDA B held by ``optimizer``; created by :func:`attach_freezing`.

    Attributes for a plain loop: ``step`` (optimizer steps done), ``total_steps``, ``frozen_columns`` (over all
    modules), ``total_columns``, ``frozen_fraction``, ``released``; ``state()`` returns them as a dict.
    ``freeze_end_step`` is the step by which B is fully frozen (for ``lamda_peft.loss_ratio``).
    """

    def __init__(self, model: nn.Module, optimizer: Any, total_steps: int, *, adapter_name: Optional[str] = None,
                 release: Release = "auto", start_step: int = 0) -> None:
        self.total_steps = check_total_steps(total_steps)
        check_release(release)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0 (the optimizer steps already done), got {start_step!r}")
        # DeepSpeed ZeRO: its optimizer (found through accelerate's wrapper too) owns B's master copy.
        self.zero = zero_optimizer.find_zero_optimizer(optimizer)
        self.optimizer = None if self.zero is not None else _innermost_optimizer(optimizer)
        inner_model, ddp = _unwrap_ddp(zero_optimizer.unwrap_engine(model))
        self.targets = self._find_targets(inner_model, adapter_name)
        self._check_optimizer_holds_b(start_step)
        self.release_mode = release
        self.release_blocked = self._release_blocked_reason(ddp)
        self._warned_blocked = False
        self.step = start_step
        if self.zero is not None:
            anchored = anchor_zero_weight_decay(inner_model, self.zero)  # hooked first, as below
            self._hooks = [anchored] if anchored is not None else []
            self._hooks.append(zero_optimizer.register_step_hooks(self.zero, self._before_optimizer_step,
                                                                  self._after_optimizer_step))
        else:
            # Weight decay toward the pretrained model (anchored_decay.py), hooked first: its post-step correction
            # must reach a column before the schedule below snapshots it.
            anchored = anchor_weight_decay(inner_model, self.optimizer)
            self._hooks = [anchored] if anchored is not None else []
            self._hooks += [
                self.optimizer.register_step_pre_hook(self._before_optimizer_step),
                self.optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
        self._apply_schedule()

    # -- discovery and checks --------------------------------------------------------------------------
    @staticmethod
    def _find_targets(model: nn.Module, adapter_name: Optional[str]) -> list[_FrozenB]:
        configs = _peft_configs(model)
        targets = []
        for name, layer in model.named_modules():
            if not isinstance(layer, LamdaLayer):
                continue
            adapters = [adapter_name] if adapter_name is not None else layer.active_adapters
            for adapter in adapters:
                if adapter not in layer.lamda_B:
                    continue
                config = configs.get(adapter)
                if not isinstance(config, LamdaConfig):
                    continue
                frozen_columns(0, 1, config.freeze_order)  # validates the order (the config may have been mutated)
                targets.append(_FrozenB(name, layer, adapter, layer.r[adapter], check_freeze_ratio(config.freeze_ratio),
                                        config.freeze_order))
        if not targets:
            which = f"adapter {adapter_name!r}" if adapter_name is not None else "an active LaMDA adapter"
            raise ValueError(
                f"the model has no LaMDA layer with {which}; build it with peft.get_peft_model(model, LamdaConfig(...)) "
                "(and set_adapter the LaMDA adapter) before attaching the freezing schedule"
            )
        return targets

    def _check_optimizer_holds_b(self, start_step: int) -> None:
        held = set() if self.optimizer is None else {id(p) for group in self.optimizer.param_groups
                                                     for p in group["params"]}
        for target in self.targets:
            if id(target.B) in held or (self.zero is not None and zero_optimizer.holds(self.zero, target.B)):
                continue
            fully_frozen = freeze_count(start_step, self.total_steps, target.r, target.freeze_ratio) == target.r
            if not target.B.requires_grad and fully_frozen:
                continue  # released before (e.g. a resumed run): nothing to do for it
            raise ValueError(
                f"the optimizer does not hold {target.name}.lamda_B.{target.adapter}: the freezing schedule acts on the "
                "optimizer that trains B. Build the optimizer from the PEFT model's parameters (e.g. "
                "torch.optim.AdamW(peft_model.parameters(), ...)) and pass that optimizer."
            )

    def _release_blocked_reason(self, ddp: Optional[nn.Module]) -> Optional[str]:
        """Why B may not be released once fully frozen (None: it may)."""
        if self.release_mode == "never":
            return "release='never'"
        if self.zero is not None:
            if self.release_mode == "always":
                raise ValueError("release='always' is not possible under DeepSpeed ZeRO: its partitions and optimizer "
                                 "state are built at deepspeed.initialize and cannot drop B later; use release='auto' "
                                 "(B stays allocated and masked, its frozen columns exact)")
            return ("DeepSpeed ZeRO built its partitions, gradient buckets and optimizer state with B trainable at "
                    "deepspeed.initialize; B stays in them, masked")
        if self.release_mode == "always":
            return None
        if any(_is_sharded(t.B) for t in self.targets):
            return None  # FSDP2 (fully_shard): its reduce-scatter follows requires_grad at each backward
        if ddp is not None:
            if getattr(ddp, "find_unused_parameters", False) and not getattr(ddp, "static_graph", False):
                return None
            return ("DDP built its gradient buckets with B trainable (find_unused_parameters=False or static_graph); "
                    "turning B's gradient off would break the reduction")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ("a data-parallel run (torch.distributed is initialized) whose DDP wrapper was not passed in; "
                    "under DDP with find_unused_parameters=False turning B's gradient off would break the reduction. "
                    "Pass release='always' if the wrapper was built with find_unused_parameters=True")
        return None

    # -- public state ----------------------------------------------------------------------------------
    @property
    def frozen_columns(self) -> int:
        return sum(t.k for t in self.targets)

    @property
    def total_columns(self) -> int:
        return sum(t.r for t in self.targets)

    @property
    def frozen_fraction(self) -> float:
        return self.frozen_columns / self.total_columns

    @property
    def released(self) -> bool:
        return all(t.released for t in self.targets)

    @property
    def freeze_end_step(self) -> int:
        """The step by which every B is fully frozen: ceil(freeze_ratio T), the largest over the adapters."""
        return max(freeze_end_step(self.total_steps, t.freeze_ratio) for t in self.targets)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "frozen_columns": self.frozen_columns,
            "total_columns": self.total_columns,
            "frozen_fraction": self.frozen_fraction,
            "released": self.released,
            "release_blocked": self.release_blocked,
        }

    def set_step(self, step: int) -> None:
        """Jump the schedule forward to ``step`` (e.g. to a Trainer's global step); it never unfreezes."""
        if step < self.step:
            raise ValueError(f"the freezing schedule cannot go back (at step {self.step}, asked for {step})")
        self.step = step
        self._apply_schedule()

    def detach(self) -> None:
        """Remove the optimizer hooks and the gradient masks. A released B stays released."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for target in self.targets:
            target.layer.b_frozen_columns.pop(target.adapter, None)

    # -- the schedule ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply_schedule(self) -> None:
        for target in self.targets:
            k = freeze_count(self.step, self.total_steps, target.r, target.freeze_ratio)
            if k > target.k:
                self._freeze(target, k)
            if target.k == target.r and not target.released and self.release_blocked is None:
                self._release(target)
        if self.release_blocked and not self._warned_blocked and all(t.k == t.r for t in self.targets):
            self._warned_blocked = True
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
                logger.warning("lamda_peft: B is fully frozen at step %d but stays allocated and masked: %s.",
                               self.step, self.release_blocked)

    def _freeze(self, target: _FrozenB, k: int) -> None:
        # A deferred init (config read from disk, meta-device base) must run before the snapshot, or the frozen
        # columns would be restored to the zero placeholders after every step.
        target.layer.materialize()
        # Under ZeRO the value to keep is the fp32 master copy, read whole (collective, same step on every rank).
        B = zero_optimizer.full_master_value(target.B) if self.zero is not None else _local(target.B.detach())
        if target.snapshot is None:
            target.snapshot = torch.empty_like(B)
        new = frozen_columns(k, target.r, target.order)
        target.snapshot[:, new].copy_(B[:, new])  # already-frozen columns hold their snapshot values anyway
        target.k = k
        target.layer.b_frozen_columns[target.adapter] = new

    def _release(self, target: _FrozenB) -> None:
        """B fully frozen: no gradient, no gradient computation, no optimizer state, from now on."""
        layer, adapter = target.layer, target.adapter
        names = layer.frozen_peft_weight_names.get(adapter, ())
        if "lamda_B" not in names:
            layer.frozen_peft_weight_names[adapter] = names + ("lamda_B",)
        layer._freeze_non_trainable_peft_weights(adapter)
        B = target.B
        B.grad = None
        self.optimizer.state.pop(B, None)
        layer.b_frozen_columns.pop(adapter, None)
        target.snapshot = None
        target.released = True

    # -- optimizer hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for target in self.targets:
            grad = target.B.grad
            if target.k and not target.released and grad is not None:
                _local(grad)[:, target.columns()] = 0

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for target in self.targets:
            if target.k and not target.released:
                columns = target.columns()
                if self.zero is not None:
                    zero_optimizer.restore_columns(target.B, target.snapshot, columns)
                else:
                    _local(target.B.detach())[:, columns] = target.snapshot[:, columns]
        self.step += 1
        self._apply_schedule()


def attach_freezing(model: nn.Module, optimizer: Any, total_steps: int, *, adapter_name: Optional[str] = None,
                    release: Release = "auto", start_step: int = 0) -> PMBFreezer:
    """Freeze the columns of every LaMDA B gradually while ``optimizer`` trains ``model`` (method.md 3.2).

    Args:
        model: the PEFT model (or its DDP wrapper: then the release decision sees ``find_unused_parameters``).
        optimizer: any torch optimizer holding the model's B parameters (or a wrapper with ``.optimizer``), or
            DeepSpeed's ZeRO optimizer (``engine.optimizer``; ``model`` may then be the engine).
        total_steps: T, the number of optimizer steps of the run.
        adapter_name: the LaMDA adapter to freeze (default: every active LaMDA adapter).
        release: once B is fully frozen, turn its gradient off and drop its optimizer state: ``"auto"`` (single
            process, FSDP2, or DDP with find_unused_parameters=True), ``"always"``, ``"never"`` (keep masking).
        start_step: optimizer steps already done (a resumed run); the columns frozen by then are frozen at once,
            with their current values.

    Returns the :class:`PMBFreezer` (its ``state()``, ``frozen_columns``, ``frozen_fraction`` report progress).
    """
    return PMBFreezer(model, optimizer, total_steps, adapter_name=adapter_name, release=release, start_step=start_step)
