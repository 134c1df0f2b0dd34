"""Optimizer parameter groups with one learning rate per role: LaMDA's core S, the projection B, the head.

LaMDA trains two very different tensors per module: S (r x r, starts at I) and B (d_out x r, starts at
U_r diag(sqrt(sigma_r / s)), frozen gradually), plus a classification head trained in full. Adam moves every entry
by about ``lr`` per step whatever its gradient's scale, so one learning rate for all three is a choice, not a
neutral default. This module builds the groups from the layers' *registered containers*, never from parameter
names:

    role        container                                      learning rate
    "lamda_S"   LamdaLayer.lamda_S                             lr_S    (default: default_lr_S(lr, r), per rank)
    "lamda_B"   LamdaLayer.lamda_B                             lr_B    (default: lr * LAMDA_LR_B_MULTIPLIER)
    "lorafa_B"  LoraFALayer.lorafa_B                           lr_B    (default: lr)
    "head"      PEFT's ModulesToSaveWrapper.modules_to_save    lr_head (default: lr)
    "adapter"   every other PEFT tuner layer's adapter_layer_names (e.g. LoRA's lora_A, lora_B)   lr

Usage, with a plain loop:

    groups = lamda_param_groups(peft_model, lr=1e-3)
    optimizer = torch.optim.AdamW(groups)
    freezer = attach_freezing(peft_model, optimizer, total_steps)

with the transformers Trainer (its scheduler scales every group's lr by the same factor):

    trainer = Trainer(model=peft_model, args=args, ..., optimizers=(torch.optim.AdamW(groups), None),
                      callbacks=[LamdaCallback()])
    # or: Trainer(..., optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups}))

Freezing (``lamda_peft.freezing``) releases a fully frozen B: its ``requires_grad`` turns off and its optimizer state
is dropped, but it stays in its group, where torch optimizers skip a parameter without a gradient. A "lamda_B" group
whose every B is released is therefore idle, not an error.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from ._options import (  # noqa: F401 (public here; defined there, light, for the CLI's checks before torch)
    GROUPED_METHODS, LAMDA_LR_B_MULTIPLIER, LAMDA_LR_S_MULTIPLIER, LAMDA_LR_S_REFERENCE_RANK, LAMDA_LR_S_STEEP_RANK,
    check_lr as _check_lr, check_lr_options, default_lr_S, given_lr_options,
)

#: the role of each registered container; containers of other tuner layers get the role "adapter"
CONTAINER_ROLES = {"lamda_S": "lamda_S", "lamda_B": "lamda_B", "lorafa_B": "lorafa_B", "modules_to_save": "head"}
ROLES = ("lamda_S", "lamda_B", "lorafa_B", "head", "adapter")


def _container_params(container: Any) -> Iterable[nn.Parameter]:
    """The parameters of one adapter container (a ParameterDict or a ModuleDict), every adapter included."""
    if isinstance(container, nn.ParameterDict):
        return container.values()
    if isinstance(container, nn.Module):
        return container.parameters()
    return ()


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """{id(parameter): role} for every parameter held by a PEFT tuner layer's or a ModulesToSaveWrapper's
    registered adapter containers (trainable or not)."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        for container_name in getattr(module, "adapter_layer_names", ()):
            role = CONTAINER_ROLES.get(container_name, "adapter")
            if isinstance(module, ModulesToSaveWrapper) != (role == "head"):
                continue  # a tuner layer whose container happens to be called "modules_to_save"
            for param in _container_params(getattr(module, container_name, None)):
                roles.setdefault(id(param), role)
    return roles


def no_decay_parameters(model: nn.Module) -> set[int]:
    """{id(parameter)} of the parameters that weight decay leaves alone, as the transformers Trainer does: every
    module's registered ``bias`` and the parameters of normalization layers (LayerNorm, RMSNorm and the like)."""
    exempt: set[int] = set()
    for module in model.modules():
        norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("Norm", "LayerNorm"))
        for name, param in module.named_parameters(recurse=False):
            if norm or name == "bias":
                exempt.add(id(param))
    return exempt


def _lamda_S_ranks(model: nn.Module) -> dict[int, int]:
    """{id(S): its module's rank} for every LaMDA core S (from the layer's registered ``r``, not the tensor's shape,
    which a ZeRO-3 partition empties)."""
    return {id(param): int(module.r[adapter]) for module in model.modules()
            if isinstance(getattr(module, "lamda_S", None), nn.ParameterDict) and isinstance(module, BaseTunerLayer)
            for adapter, param in module.lamda_S.items()}


def lamda_param_groups(model: nn.Module, lr: float, *, lr_S: Optional[float] = None, lr_B: Optional[float] = None,
                       lr_head: Optional[float] = None, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Torch optimizer parameter groups for a PEFT model, one per role present, each with its own learning rate.

    Args:
        model: a PEFT model (LaMDA, LaMDA++, LoRA-FA, or any PEFT tuner; ``modules_to_save`` heads).
        lr: the base learning rate (LoRA's B/A, and the default of the others).
        lr_S: LaMDA's core S (r x r); default :func:`default_lr_S` of each module's rank (5x ``lr`` up to r = 16,
            less above: S's tensors of different ranks, e.g. LaMDA++'s, then form one group per rate).
        lr_B: LaMDA's and LoRA-FA's B (d_out x r); default ``lr * LAMDA_LR_B_MULTIPLIER`` for LaMDA, ``lr`` for
            LoRA-FA.
        lr_head: the modules trained in full (``modules_to_save``, e.g. a classification head); default ``lr``.
        weight_decay: the decoupled weight decay of every group (frozen B columns are immune: freezing.py
            restores them after each step). Biases and normalization weights (e.g. a head's bias) are exempt, as
            in the transformers Trainer: with ``weight_decay > 0`` they form a second group of their role with
            ``weight_decay=0``.

    Returns a list of ``{"params": [...], "lr": float, "weight_decay": float, "role": str}`` (roles in the order
    of ``ROLES``; a role without trainable parameters is left out; within a role, groups by decreasing rate; a
    role's exempt parameters follow it in their own group). Only parameters with ``requires_grad=True`` are
    included, each once.

    Raises ValueError on a trainable parameter that belongs to none of the registered containers (e.g. a base weight
    unfrozen by hand): it would otherwise be trained at an unintended rate or silently not at all.
    """
    base = _check_lr("lr", lr)
    lrs = {"lamda_S": _check_lr("lr_S", lr_S) if lr_S is not None else None,  # None: per rank (below)
           "lamda_B": _check_lr("lr_B", lr_B) if lr_B is not None else base * LAMDA_LR_B_MULTIPLIER,
           "lorafa_B": _check_lr("lr_B", lr_B) if lr_B is not None else base,
           "head": _check_lr("lr_head", lr_head) if lr_head is not None else base, "adapter": base}
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    roles = parameter_roles(model)
    grouped: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    seen: set[int] = set()
    unknown = []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        role = roles.get(id(param))
        if role is None:
            unknown.append(name)
        else:
            grouped[role].append(param)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"lamda_param_groups does not know the trainable parameter(s) {shown}: they are not in a PEFT adapter "
            "container nor in modules_to_save. Train such a module through the config's modules_to_save, freeze it "
            "(requires_grad_(False)), or add it to the optimizer as a group of your own."
        )
    exempt = no_decay_parameters(model) if weight_decay > 0 else set()
    ranks = _lamda_S_ranks(model) if lrs["lamda_S"] is None and grouped["lamda_S"] else {}
    groups = []
    for role, params in grouped.items():
        rate = {id(p): lrs[role] if lrs[role] is not None else default_lr_S(base, ranks[id(p)]) for p in params}
        for value in sorted(set(rate.values()), reverse=True):
            decayed = [p for p in params if rate[id(p)] == value and id(p) not in exempt]
            spared = [p for p in params if rate[id(p)] == value and id(p) in exempt]
            for members, decay in ((decayed, float(weight_decay)), (spared, 0.0)):
                if members:
                    groups.append({"params": members, "lr": value, "weight_decay": decay, "role": role})
    return groups


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: role, learning rate, number of tensors and of scalars (for logs)."""
    return "; ".join(f"{g.get('role', '?')}: lr {g['lr']:g}, {len(g['params'])} tensors, "
                     f"{sum(p.numel() for p in g['params']):,} parameters" for g in groups)


def trainer_optimizers(model: nn.Module, args: Any) -> tuple[Optional[torch.optim.Optimizer], None]:
    """``Trainer(optimizers=...)`` for the CLI: AdamW over :func:`lamda_param_groups` for LaMDA, LaMDA++ and
    LoRA-FA; ``(None, None)`` (the Trainer's own AdamW) for the other methods, which reject the per-group options."""
    check_lr_options(args)
    if args.method not in GROUPED_METHODS:
        return None, None
    weight_decay = float(getattr(args, "weight_decay", 0.0) or 0.0)  # --weight-decay, as the Trainer's AdamW would use it
    groups = lamda_param_groups(model, args.lr, weight_decay=weight_decay, **given_lr_options(args))
    # The Trainer logs the first group's learning rate: put the groups at --lr first, so the logged value is --lr's
    # schedule (not S's 5x) whenever some group uses it.
    groups.sort(key=lambda group: group["lr"] != args.lr)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=weight_decay), None


def __getattr__(name: str) -> Any:
    """``add_lr_arguments``, the CLI's, under its old path (imported on use: the library never imports cli/)."""
    if name == "add_lr_arguments":
        from .cli.arguments import add_lr_arguments

        return add_lr_arguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
