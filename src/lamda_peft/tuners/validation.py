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
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
