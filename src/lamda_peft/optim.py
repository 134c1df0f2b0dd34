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

#: lr_S = lr * this (up to rank LAMDA_LR_S_REFERENCE_RANK) and LaMDA's lr_B = lr * that when not given. One Adam step
#: on S moves the model ~9x less than a LoRA step at the same lr (the paper's init makes S's step a *relative* lr on
#: each module's top-r part). On SST-2 at 100 steps (lr 1e-3, r = 8) 10x gave 70.5 (3 seeds) instead of 59.1 at 1x
#: (2 seeds), and 5x 69.6 (paired -0.9 +- 1.6: even within noise). 5x rather than 10x (session 6): at 400 steps it
#: gains 1.3 points on SST-2 (3 seeds, each up), ends LaMDA++'s stall at the label mean on STS-B (81.7 +- 0.6 over 3
#: seeds against 71.2 +- 15.1), and at lr 3e-3 LaMDA learns (74.7) where 10x went to chance. Lowering B's lr gave
#: nothing. docs/learning_rates.md has the numbers.
LAMDA_LR_S_MULTIPLIER = 5.0
LAMDA_LR_B_MULTIPLIER = 1.0
#: Above this rank S's default rate falls as 1/r. Adam moves each of S's r^2 entries by ~lr_S, so a step changes the
#: module by about lr_S * (sigma_1 + ... + sigma_r): it grows with r. At r = 32 the 10x rate never learned (SST-2,
#: 400 steps: 56.4, train loss 0.67) where 3x reached 80.5 and one lr 78.6, and at r = 16 the rule's 5x gave 80.0
#: where 10x gave 75.7 (results/lamda_ablation.md): the 5x holds up to r = 16, as measured there.
LAMDA_LR_S_REFERENCE_RANK = 16
#: Above this rank it falls once more as 1/r (1/r^2 overall): at r = 64 the 1/r rule's rate (1.25x) never learned on
#: one of 3 seeds (SST-2, 400 steps: 50.9, loss 0.69 throughout) and twice it never learned either, while half of it
#: (0.625x) learned on every seed (81.1 / 78.2 / 75.5). At r = 32 the 1/r rate has a 2x margin (5x still learns).
LAMDA_LR_S_STEEP_RANK = 32
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


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def default_lr_S(lr: float, rank: int) -> float:
    """S's learning rate when none is given: ``lr * LAMDA_LR_S_MULTIPLIER`` up to rank ``LAMDA_LR_S_REFERENCE_RANK``,
    then ``* LAMDA_LR_S_REFERENCE_RANK / rank``, and above ``LAMDA_LR_S_STEEP_RANK`` ``* LAMDA_LR_S_STEEP_RANK / rank``
    once more (5x at r <= 16, 2.5x at r = 32, 0.625x at r = 64)."""
    return (lr * LAMDA_LR_S_MULTIPLIER * min(1.0, LAMDA_LR_S_REFERENCE_RANK / rank)
            * min(1.0, LAMDA_LR_S_STEEP_RANK / rank))


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


def add_lr_arguments(parser_group: Any) -> None:
    """The per-group learning-rate options of ``lamda-peft train`` (only LaMDA, LaMDA++ and LoRA-FA use them)."""
    parser_group.add_argument("--lr-S", dest="lr_S", type=float,
                              help=f"LaMDA: learning rate of the core S (default lr x {LAMDA_LR_S_MULTIPLIER:g} up to "
                                   f"r = {LAMDA_LR_S_REFERENCE_RANK}, x {LAMDA_LR_S_MULTIPLIER:g} x "
                                   f"{LAMDA_LR_S_REFERENCE_RANK}/r up to r = {LAMDA_LR_S_STEEP_RANK}, and x "
                                   f"{LAMDA_LR_S_STEEP_RANK}/r once more above)")
    parser_group.add_argument("--lr-B", dest="lr_B", type=float, help="LaMDA, LoRA-FA: learning rate of B (default lr)")
    parser_group.add_argument("--lr-head", dest="lr_head", type=float,
                              help="learning rate of the head trained in full (default lr)")


GROUPED_METHODS = ("lamda", "lamda++", "lora-fa")


def given_lr_options(args: Any) -> dict[str, float]:
    """The per-group learning rates given on the command line ({} when none: the run's config stays as before)."""
    return {k: getattr(args, k) for k in ("lr_S", "lr_B", "lr_head") if getattr(args, k, None) is not None}


def check_lr_options(args: Any) -> None:
    """Reject per-group learning rates that the method would ignore, or that are not positive (before any work)."""
    given = given_lr_options(args)
    for name, value in given.items():
        _check_lr("--" + name.replace("_", "-"), value)
    if given and args.method not in GROUPED_METHODS:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} apply to --method lamda, lamda++ and lora-fa only (got --method {args.method})")
    if args.method == "lora-fa" and "lr_S" in given:
        raise ValueError("--lr-S applies to LaMDA only: LoRA-FA has no core S")


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
