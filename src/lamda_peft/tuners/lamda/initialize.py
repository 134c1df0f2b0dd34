"""``lamda_peft.initialize``: the data-driven inits of LaMDA, computed after ``get_peft_model`` on a few batches.

    model = get_peft_model(base, LamdaConfig(init="gradient", target_modules="all-linear", task_type=...))
    lamda_peft.initialize(model, train_dataloader, num_batches=8)
    # then train as usual (LamdaCallback, lamda_param_groups, ...); training or saving before this raises

init="activations" (activations.py): A spans the top-r principal directions of each layer's input activations;
calibration batches need no labels.

init="gradient" (gradient.py): A and B0 span the top-r right and left singular subspaces of G = dL/dW0, the gradient
of the training loss with respect to the frozen base weight, accumulated over the calibration batches (which carry
``labels``, as in training). G is never formed: randomized sketches through zero-valued parameters, O((d_in + d_out)
(r + oversample)) memory per module. With U (d_out, r), V^T (r, d_in) orthonormal from G's SVD:

    c  = ||U^T W0 V||_F / (sqrt(r) s)          W0's mean magnitude in those subspaces, over the scale s
    A  = sqrt(c) V^T,   B = B0S0 = sqrt(c) U,   S = I

so that one step on S moves W0 by about as much, relative to its size there, as the spectral init's does; B's
columns come in the order of G's singular values, so ``freeze_order`` keeps its meaning. A classification head that
starts random gives a meaningless gradient: ``head_warmup_steps`` first trains the head alone on the batches.

Both: the delta form keeps step 0 exact whatever A and B are; the factors are saved in the adapter file and a reload
never recalibrates; under DDP (``torch.distributed`` initialized) every rank passes its own batches, the statistics
are summed over ranks and rank 0's factors are broadcast (collectives: call it on every rank); a model already sharded
by FSDP2 is refused (initialize before sharding). A second call, or one on a loaded adapter, is refused: it would
reset A, B and S.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...integrations.deepspeed import broadcast_from_first_rank
from ..delta import weight_as_out_in
from .activations import _forward_dict, activation_factors, input_second_moments
from .config import CALIBRATED_INITS
from .gradient import LossFn, gradient_top_svd, model_loss
from .layer import LamdaLayer

Factors = dict[str, torch.Tensor]


def initialize(model: nn.Module, dataloader: Iterable, *, num_batches: int = 8, adapter_name: Optional[str] = None,
               show_progress_bar: Optional[bool] = None,
               forward_fn: Callable[[nn.Module, Any], Any] = _forward_dict, loss_fn: LossFn = model_loss,
               head_warmup_steps: int = 0, head_lr: float = 1e-3, oversample: int = 8, power_iterations: int = 1,
               seed: int = 0) -> None:
    """Initialize every layer of a LaMDA adapter created with ``init="activations"`` or ``init="gradient"``.

    Args:
        model: the PeftModel holding the adapter, not initialized yet.
        dataloader: yields dicts of tensors as the model takes them (a collator's output); the first
            ``num_batches`` are used (with ``labels`` for the gradient init).
        adapter_name: default: the single active adapter.
        forward_fn: activations: ``forward_fn(model, batch)`` runs one batch (default: ``model(**batch)``).
        loss_fn: gradient: ``loss_fn(model, batch)`` returns the loss (default: ``model(**batch).loss``).
        head_warmup_steps: gradient: AdamW steps (lr ``head_lr``) on the modules trained in full
            (``modules_to_save``, e.g. a new classification head) before the gradient is taken; 0: none.
        oversample, power_iterations, seed: gradient: the randomized sketch (gradient.py).

    Raises ValueError for a model without such an adapter, an adapter already initialized, an empty dataloader, a
    layer with too little data (activations) or no gradient (gradient), or an FSDP2-sharded weight.
    """
    _initialize(model, dataloader, CALIBRATED_INITS, num_batches=num_batches, adapter_name=adapter_name,
                show_progress_bar=show_progress_bar, forward_fn=forward_fn, loss_fn=loss_fn,
                head_warmup_steps=head_warmup_steps, head_lr=head_lr, oversample=oversample,
                power_iterations=power_iterations, seed=seed)


def initialize_from_activations(model: nn.Module, dataloader: Iterable, *, num_batches: int = 8,
                                adapter_name: Optional[str] = None,
                                forward_fn: Callable[[nn.Module, Any], Any] = _forward_dict,
                                show_progress_bar: Optional[bool] = None) -> None:
    """:func:`initialize` for an ``init="activations"`` adapter (the name it had first; refuses other inits)."""
    _initialize(model, dataloader, ("activations",), num_batches=num_batches, adapter_name=adapter_name,
                forward_fn=forward_fn, show_progress_bar=show_progress_bar)


def _initialize(model: nn.Module, dataloader: Iterable, inits: tuple[str, ...], *, num_batches: int,
                adapter_name: Optional[str], show_progress_bar: Optional[bool],
                forward_fn: Callable[[nn.Module, Any], Any] = _forward_dict, loss_fn: LossFn = model_loss,
                head_warmup_steps: int = 0, head_lr: float = 1e-3, oversample: int = 8, power_iterations: int = 1,
                seed: int = 0) -> None:
    """:func:`initialize` for an adapter whose init is one of ``inits``."""
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    adapter_name, init, layers = _uncalibrated_layers(model, adapter_name, inits)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if init == "activations":
        factors = _activation_init(model, layers, adapter_name, dataloader, num_batches, forward_fn,
                                   show_progress_bar, distributed)
    else:
        batches = _first_batches(model, dataloader, num_batches)
        if head_warmup_steps:
            warm_up_head(model, batches, head_warmup_steps, head_lr, loss_fn)
        svds = gradient_top_svd(model, layers, batches, {n: m.r[adapter_name] for n, m in layers.items()},
                                oversample=oversample, power_iterations=power_iterations, seed=seed, loss_fn=loss_fn,
                                show_progress_bar=show_progress_bar)
        factors = {}
        for name, layer in layers.items():
            if svds[name].total_energy == 0.0:
                raise ValueError(f"{name} got no gradient from the loss on the calibration batches (is it used by "
                                 "the forward, and do the batches carry labels?); exclude it from target_modules")
            factors[name] = gradient_factors(svds[name].U, svds[name].Vh, weight_as_out_in(layer.get_base_layer()),
                                             layer.scaling[adapter_name])
    for name, layer in layers.items():
        values = broadcast_from_first_rank(factors[name]) if distributed else factors[name]
        with torch.no_grad():
            for container, value in values.items():
                getattr(layer, container)[adapter_name].copy_(value)
        layer.awaiting_calibration.discard(adapter_name)


def gradient_factors(U: torch.Tensor, Vh: torch.Tensor, weight: torch.Tensor, scaling: float) -> Factors:
    """The factors of one layer from G's top-r singular vectors U (d_out, r), Vh (r, d_in) (module docstring)."""
    U, Vh = U.double(), Vh.double()
    r = U.shape[1]
    core = (U.T @ weight.double().to(U.device)) @ Vh.T  # (r, r): W0 restricted to the two subspaces
    magnitude = float(core.norm()) / r ** 0.5
    if magnitude == 0.0:  # W0 orthogonal to G's subspaces: fall back to its mean singular value
        magnitude = float(weight.double().norm()) / min(weight.shape) ** 0.5
    root = (magnitude / scaling) ** 0.5
    B = root * U
    return {"lamda_A": root * Vh, "lamda_B": B, "lamda_S": torch.eye(r, dtype=torch.float64), "lamda_B0S0": B.clone()}


def warm_up_head(model: nn.Module, batches: list, steps: int, lr: float, loss_fn: LossFn = model_loss) -> None:
    """Train the modules trained in full (``modules_to_save``: a new classification head) alone for ``steps`` AdamW
    steps on ``batches`` (cycled), in eval mode (no dropout); every other parameter is left untouched."""
    from ...optim import parameter_roles

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"head_warmup_steps must be an integer >= 0, got {steps!r}")
    roles = parameter_roles(model)
    head = [p for p in model.parameters() if roles.get(id(p)) == "head" and p.requires_grad]
    if not head:
        raise ValueError("head_warmup_steps needs modules trained in full (modules_to_save, e.g. the head of "
                         "task_type='SEQ_CLS'); this model has none: pass head_warmup_steps=0")
    others = [p for p in model.parameters() if p.requires_grad and roles.get(id(p)) != "head"]
    modes = {module: module.training for module in model.modules()}
    for param in others:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(head, lr=lr)
    model.eval()
    try:
        for batch in itertools.islice(itertools.cycle(batches), steps):
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        for param in others:
            param.requires_grad_(True)
        for module, training in modes.items():
            module.training = training


def _activation_init(model: nn.Module, layers: Mapping[str, LamdaLayer], adapter_name: str, dataloader: Iterable,
                     num_batches: int, forward_fn: Callable, show_progress_bar: Optional[bool],
                     distributed: bool) -> dict[str, Factors]:
    grams, counts = input_second_moments(model, layers, dataloader, num_batches=num_batches, forward_fn=forward_fn,
                                         show_progress_bar=show_progress_bar)
    if distributed:  # data parallel: every rank saw its own batches; all ranks must get the same A (collectives)
        for name in layers:
            dist.all_reduce(grams[name])
            seen = torch.tensor([counts[name]], dtype=torch.float64, device=grams[name].device)
            dist.all_reduce(seen)
            counts[name] = int(seen.item())
    factors = {}
    for name, layer in layers.items():
        r = layer.r[adapter_name]
        if counts[name] < r:
            raise ValueError(f"{name} saw {counts[name]} input rows in {num_batches} batches, fewer than its rank "
                             f"r={r}: its principal directions are undetermined; pass more (or longer) batches")
        weight = weight_as_out_in(layer.get_base_layer())
        factors[name] = activation_factors(grams[name], weight, r, layer.scaling[adapter_name])
    return factors


def _first_batches(model: nn.Module, dataloader: Iterable, num_batches: int) -> list[dict]:
    """The first ``num_batches`` batches on the model's device, kept: the gradient init reads them once per pass."""
    device = next(model.parameters()).device
    batches = []
    for batch in itertools.islice(dataloader, num_batches):
        if not isinstance(batch, Mapping):
            raise TypeError(f"the dataloader must yield dicts of tensors (a collator's output), got {type(batch).__name__}")
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    if not batches:
        raise ValueError("the dataloader yielded no batch; the gradient init needs calibration data")
    return batches


def _uncalibrated_layers(model: nn.Module, adapter_name: Optional[str],
                         inits: tuple[str, ...]) -> tuple[str, str, dict[str, LamdaLayer]]:
    """(adapter name, its init, {name: layer}) after the checks every data-driven init shares."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError("lamda_peft.initialize needs a PEFT model: call peft.get_peft_model(base, "
                         "LamdaConfig(init='gradient' or 'activations', ...)) first")
    if adapter_name is None:
        active = list(getattr(model, "active_adapters", []))
        if len(active) != 1:
            raise ValueError(f"the model has {len(active)} active adapters ({active}); pass adapter_name=...")
        adapter_name = active[0]
    init = getattr(configs.get(adapter_name), "init", None)
    if init not in inits:
        wanted = " or ".join(f"init={i!r}" for i in inits)
        raise ValueError(f"adapter {adapter_name!r} was not created with LamdaConfig({wanted}) (its init is "
                         f"{init!r}); a data-driven init would replace its own init")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LamdaLayer) and adapter_name in m.r}
    for layer in layers.values():
        layer.materialize()  # a deferred init (a config read from disk, nothing loaded) runs first: placeholders
    done = [name for name, m in layers.items() if adapter_name not in m.awaiting_calibration]
    if done:
        raise ValueError(
            f"adapter {adapter_name!r} is already initialized ({done[0]} holds real factors: from an earlier "
            "initialize call, or from a checkpoint); calling it again would reset A, B and S and throw away any "
            "training. To recalibrate, create a fresh adapter (get_peft_model or add_adapter).")
    sharded = [name for name, m in layers.items() if callable(getattr(m.get_base_layer().weight, "to_local", None))]
    if sharded:
        raise ValueError(f"{sharded[0]} has a sharded (FSDP2) weight: run lamda_peft.initialize before sharding "
                         "(fully_shard / accelerator.prepare), on every rank")
    return adapter_name, init, layers
