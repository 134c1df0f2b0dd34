"""What the LaMDA and LoRA-FA tuners share: module replacement with per-module rank and alpha."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import (
    MIN_TARGET_MODULES_FOR_OPTIMIZATION,
    BaseTuner,
    BaseTunerLayer,
    _find_minimal_target_modules,
    _maybe_include_all_linear_layers,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key

from ..allocation import allocate_energy_ranks
from .base_layer import LowRankDeltaLayer
from .checkpoint import is_loaded_from_checkpoint
from ..spectral import TopSVD, top_svds
from .delta import base_weight_shape, weight_as_out_in
from .quantized import keep_training_layout


class LowRankDeltaTuner(BaseTuner):
    """A PEFT tuner that wraps each targeted Linear/Conv1D in ``tuner_layer_cls`` (a ``LowRankDeltaLayer``).

    Default target modules per architecture are LoRA's, since the methods adapt the same layers.
    """

    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``, which PEFT passes here after creating or loading an adapter.

        True (PEFT's default): S, B and B0S0 in float32 under a float16/bfloat16 base, as PEFT upcasts LoRA's weights.
        False: they keep the base layer's dtype, as PEFT's LoRA does. A stays in the base dtype either way (PEFT's
        default would upcast it too, and every step would cast it back: a saved copy per layer).
        """
        for module in self.model.modules():
            if isinstance(module, LowRankDeltaLayer):
                module.set_autocast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT runs every forward and generate inside this. Mixed adapter batches (``adapter_names=``, a LoRA
        feature) are not implemented here, and PEFT would drop the argument: the whole batch would silently go
        through the active adapter. Refuse it instead."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names (mixed adapter batches) is not supported by LaMDA and LoRA-FA adapters; run one batch "
                "per adapter after model.set_adapter(name), or use model.disable_adapter() for the base model."
            )
        yield

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT calls this when it starts loading saved weights into ``adapter_name``: the signal that the layers'
        deferred init (see checkpoint.py) must wait for the checkpoint instead of running the decomposition."""
        for module in model.modules():
            if isinstance(module, LowRankDeltaLayer):
                module.expect_checkpoint(adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """PEFT's injection, preceded by LaMDA++'s rank allocation when the config asks for it.

        The allocation is written into the caller's config object, as PEFT's own methods fill in the config they
        are given (``model.peft_config[name] is config``): a later ``PeftModel.from_pretrained(..., config=config)``
        or ``add_adapter(..., config)`` reuses it instead of allocating again. Should the injection fail, the config
        gets its fields back. The SVDs are kept until each layer's spectral init has used them, so every weight is
        decomposed once.
        """
        keep_training_layout(model)  # before any init reads a 4-bit weight (see quantized.py)
        self._svd_cache: dict[str, Any] = {}
        config = self.peft_config[adapter_name]
        planned, restore = None, None
        if getattr(config, "rank_allocation", "uniform") == "energy" and state_dict is None:
            restore = _allocation_fields(config)
            planned = find_target_modules(model, config, self.target_module_mapping)
            self._svd_cache = allocate_energy_ranks(config, planned)
            if not self._svd_cache and _needs_spectral_init(config, state_dict):  # an allocation reused as is
                self._svd_cache = prefetch_decompositions(config, planned)
        elif _needs_spectral_init(config, state_dict):
            # Decompose every targeted weight up front, several at once (eigensolver.decompose_many), instead of one
            # after the other as PEFT creates the layers; each layer's init then takes its own decomposition.
            self._svd_cache = prefetch_decompositions(config, find_target_modules(model, config, self.target_module_mapping))
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
            if planned is not None:
                _check_allocated_modules_were_wrapped(model, adapter_name, planned)
        except BaseException:
            for name, value in (restore or {}).items():
                setattr(config, name, value)
            raise
        finally:
            self._svd_cache = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs: Any):
        if current_key is None:
            raise ValueError("current_key must be given to match rank_pattern and alpha_pattern")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        kwargs = dict(r=r, lora_alpha=alpha, module_name=current_key, defer_init=is_loaded_from_checkpoint(config))
        svd = getattr(self, "_svd_cache", {}).pop(current_key, None)
        if svd is not None:  # LaMDA++ already decomposed this weight
            kwargs["svd"] = svd
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            base_weight_shape(base)
        except TypeError as err:
            raise TypeError(f"{current_key}: {err}") from None
        new_module = self.tuner_layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trainable until set_adapter selects it
        self._replace_module(parent, target_name, new_module, target)


def _check_allocated_modules_were_wrapped(model: nn.Module, adapter_name: str, planned: dict[str, nn.Module]) -> None:
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.r]
    if wrapped != list(planned):  # our copy of PEFT's matching drifted from PEFT's: never allocate silently
        raise RuntimeError(
            f"LaMDA++ allocated ranks for {len(planned)} modules but PEFT wrapped {len(wrapped)}; please report "
            "this with your target_modules, or list the target modules explicitly."
        )


def _allocation_fields(config: Any) -> dict[str, Any]:
    """The config fields LaMDA++ writes, as they are before it runs (restored if the injection fails)."""
    return {name: copy.copy(getattr(config, name)) for name in ("rank_pattern", "r_min", "r_max", "rank_budget")}


def _needs_spectral_init(config: Any, state_dict: Optional[dict]) -> bool:
    """A fresh adapter whose layers will decompose their weights now (not LoRA-FA, random, activations, a reload)."""
    spectral = getattr(config, "init", "random") in ("spectral", "spectral_zero")
    return spectral and state_dict is None and not is_loaded_from_checkpoint(config)


def prefetch_decompositions(config: Any, modules: dict[str, nn.Module]) -> dict[str, TopSVD]:
    """{module name: top-r SVD} of each targeted weight with its rank (rank_pattern or r), as the layer would compute
    it. Modules the layer must refuse (r too large) or defer (meta device) are left to the layer, which says why."""
    weights, ranks = {}, {}
    for name, module in modules.items():
        weight = weight_as_out_in(module)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        if weight.device.type != "meta" and 1 <= r <= min(weight.shape):
            weights[name], ranks[name] = weight, r
    return top_svds(weights, ranks, method=config.svd_method, niter=config.svd_niter, seed=config.svd_seed)


def find_target_modules(model: nn.Module, config, target_module_mapping=TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
                        ) -> dict[str, nn.Module]:
    """{name: base Linear/Conv1D} of the modules PEFT's ``inject_adapter`` wraps for ``config``, in model order.

    Same steps as PEFT: default targets per architecture, "all-linear" expanded without the output head, then
    ``check_target_module_exists`` (exclude_modules, layers_to_transform, ...). Modules inside an existing adapter
    layer are skipped, as PEFT does. Works on a shallow copy: ``config`` is not modified.
    """
    probe = copy.copy(config)
    if probe.target_modules is None:
        targets = target_module_mapping.get(BaseTuner.get_model_config(model).get("model_type"))
        if targets is None:
            raise ValueError("Please specify `target_modules` in the config: this architecture has no default")
        probe.target_modules = targets if isinstance(targets, str) else set(targets)
    probe = _maybe_include_all_linear_layers(probe, model)
    names = [name for name, _ in model.named_modules()]
    if isinstance(probe.target_modules, (list, set)) and len(probe.target_modules) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        # PEFT shortens a long list of full names to suffixes, which changes what layers_to_transform does
        suffixes = tuple("." + suffix for suffix in probe.target_modules)
        others = [n for n in names if n not in probe.target_modules and not n.endswith(suffixes)]
        shorter = _find_minimal_target_modules(probe.target_modules, others)
        if len(shorter) < len(probe.target_modules):
            probe.target_modules = shorter
    found: dict[str, nn.Module] = {}
    inside_adapter: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside_adapter):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapter.append(name + ".")
        if BaseTuner._check_target_module_exists(probe, name):
            found[name] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return found
