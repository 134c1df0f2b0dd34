"""Checks shared by the configs: a value out of range fails at construction, with the fix in the message."""

from __future__ import annotations

from typing import Any


def check_common_fields(config: Any) -> None:
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r < 1:
        raise ValueError(f"r must be a positive integer, got {config.r!r}")
    if not float(config.lora_alpha) > 0:
        raise ValueError(f"lora_alpha must be > 0 (the scaling is lora_alpha / r), got {config.lora_alpha!r}")
    if not 0.0 <= float(config.lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}")
    for name, value in config.rank_pattern.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {value!r}")
    for name, value in config.alpha_pattern.items():
        if not float(value) > 0:
            raise ValueError(f"alpha_pattern[{name!r}] must be > 0, got {value!r}")
    if not isinstance(config.init_weights, bool):
        raise ValueError(
            f"init_weights must be True (identity start) or False (perturbed start), got {config.init_weights!r}"
        )
    _check_layer_selection(config)
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)


def _check_layer_selection(config: Any) -> None:
    """PEFT's rule: layers_to_transform / layers_pattern select layers among *listed* module names.

    With a string ``target_modules`` ("all-linear" or a regex) PEFT's matching never looks at them, so they would be
    silently ignored; stock ``LoraConfig`` refuses this, and so do we.
    """
    if isinstance(config.target_modules, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(config, name) is not None:
                raise ValueError(
                    f"{name} cannot be used when target_modules is a string ({config.target_modules!r}): PEFT matches a "
                    f"string as a whole and would ignore {name}. List the module names instead, e.g. "
                    "target_modules=['q_proj', 'v_proj'], or put the layer indices into the regex."
                )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("layers_pattern only applies together with layers_to_transform; set layers_to_transform "
                         "(the layer indices to adapt) or drop layers_pattern.")
