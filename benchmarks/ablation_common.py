"""What the LaMDA ablation (``lamda_ablation.py``) and its probes (``lamda_probes.py``) share: the results folder, the
default rank, a *cell* (one run's knobs, each described in ``lamda_ablation.py``'s docstring) and its log key, the
adapter config of a cell, and the seeded calibration batches of the data-driven inits. Both scripts import it; neither
imports the other, except ``lamda_ablation.py --step-sizes / --subspace-energy`` running the probes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
R = 8  # the rank of every run unless a cell sets r
DEFAULTS = dict(method="lamda", steps=100, seed=0, lr=1e-3, lr_S=None, lr_B=None, lr_head=None, freeze_ratio=0.3,
                warmup=0.06, alpha="16", init="spectral", subspace="top", r=R, freeze_order="largest_first",
                train_size=2000, weight_decay=0.0, decay_anchor=True, calibration=128, head_warmup=0, s0="identity",
                power_iterations=1)


def cell(**kw: Any) -> dict:
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown knobs {unknown}")
    return {**DEFAULTS, **kw}


def key(c: dict) -> str:
    return json.dumps({k: c[k] for k in DEFAULTS}, sort_keys=True)


def lamda_config(c: dict, task_type):
    from peft import LoraConfig

    from lamda_peft import LamdaConfig, LoraFAConfig

    alpha = float(c["alpha"][2:]) * math.sqrt(c["r"]) if c["alpha"].startswith("rs") else float(c["alpha"])
    common = dict(r=c["r"], lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, task_type=task_type)
    if c["method"] == "lora":
        return LoraConfig(**common)
    if c["method"] == "pissa":
        return LoraConfig(**common, init_lora_weights="pissa")
    if c["method"] == "lora-fa":
        return LoraFAConfig(**common)
    extra = {"rank_allocation": "energy"} if c["method"] == "lamda++" else {}
    # None: no freezing; lamda_ablation.one_run then adds no LamdaCallback
    freeze_ratio = 1.0 if c["freeze_ratio"] is None else c["freeze_ratio"]
    init = "gradient" if c["init"] == "gradient_sign" else c["init"]  # the sign variant replaces the factors after
    return LamdaConfig(**common, init=init, freeze_ratio=freeze_ratio, freeze_order=c["freeze_order"], **extra)


def calibration_batches(dataset, collate, seed: int, num_batches: int = 8, size: int = 16) -> list[dict]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: num_batches * size].tolist()
    return [collate([dataset[i] for i in order[j:j + size]]) for j in range(0, len(order), size)]
