"""The probes behind the LaMDA ablation's diagnosis (``benchmarks/lamda_ablation.py --step-sizes`` and
``--subspace-energy``, seconds each): what one Adam step on each parameter group does to the model, and how much of
each layer's input lies in the span of A. Results: docs/results/lamda_ablation_{step_sizes,subspace}.json.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ablation_common import R, RESULTS, calibration_batches, cell, lamda_config
from glue import TASKS, split
from lamda_peft.apps.data import infer_spec
from lamda_peft.apps.models import minilm_path
from lamda_peft.cli.eval import collator_for, load_base


# ------------------------------------------------------------------------------------------------ step sizes


def _kind(name: str) -> str:
    for part, kind in (("pooler", "pooler"), ("query", "attention q/k/v"), ("key", "attention q/k/v"),
                       ("value", "attention q/k/v"), ("attention.output", "attention out"),
                       ("intermediate", "FFN in"), ("output.dense", "FFN out")):
        if part in name:
            return kind
    return "other"


@torch.no_grad()
def _delta_weights(model) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight") and "default" in getattr(m, "r", {})}


def step_sizes(lr: float = 1e-3, r: int = R) -> dict:
    """What one Adam step of size ``lr`` (its first step is lr * sign(grad)) does, per role and per module kind:
    ||Delta W||_F / ||W0||_F, and the change of the pooled [CLS] output relative to its spread over the batch."""
    from peft import TaskType, get_peft_model

    from lamda_peft.optim import parameter_roles

    train, _, _ = split("SST-2", 2000, 300)
    spec = infer_spec(train, train, **TASKS["SST-2"][1], max_length=64)
    result = {}
    for method in ("lora", "lora-fa", "lamda"):
        torch.manual_seed(0)
        model, tokenizer = load_base(minilm_path(), spec.task, 2)
        model = get_peft_model(model, lamda_config(cell(method=method, r=r, alpha=str(2 * r)), TaskType.SEQ_CLS)).eval()
        batch = collator_for(spec, tokenizer)([spec.encode(train, tokenizer)[i] for i in range(32)])
        pooled = lambda: model.base_model.model.bert(**{k: v for k, v in batch.items() if k != "labels"}).pooler_output
        model(**batch).loss.backward()
        base_norm = {n: float(m.get_base_layer().weight.norm()) for n, m in model.named_modules() if hasattr(m, "get_base_layer") and n in _delta_weights(model)}
        before, pooled0 = _delta_weights(model), pooled().detach()
        spread = float(pooled0.std(0).norm())
        roles = parameter_roles(model)
        for role in ("lamda_S", "lamda_B", "lorafa_B", "adapter"):
            params = [p for p in model.parameters() if roles.get(id(p)) == role and p.grad is not None]
            if not params:
                continue
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(-lr * torch.sign(p.grad))
            after, pooled1 = _delta_weights(model), pooled().detach()
            by_kind: dict[str, list[float]] = {}
            for n in before:
                by_kind.setdefault(_kind(n), []).append(float((after[n] - before[n]).norm()) / base_norm[n])
            result[f"{method} {role}"] = {
                "relative_dW_median_by_kind": {k: float(np.median(v)) for k, v in sorted(by_kind.items())},
                "pooled_change_over_spread": float((pooled1 - pooled0).norm(dim=1).mean()) / spread}
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
    name = "lamda_ablation_step_sizes.json" if r == R else f"lamda_ablation_step_sizes_r{r}.json"
    (RESULTS / name).write_text(json.dumps({"lr": lr, "r": r, "steps": result}, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ subspace energy


def subspace_energy(r: int = R) -> dict:
    """How much of each layer's input lies in span(A): tr(P G P) / tr(G), with G = X^T X over 128 training sentences
    *not* used for the calibration (seeded differently), for the spectral A and the activation A (calibrated on the
    ablation's batches of seed 0); and the overlap of the two subspaces, ||P_spec P_act||_F^2 / r. A random
    r-dimensional subspace holds r / d_in of the energy on average (8/384 = 2.1%, 8/1536 = 0.5%)."""
    from peft import TaskType, get_peft_model

    from lamda_peft import LamdaConfig, LamdaLayer
    from lamda_peft.tuners.lamda.activations import input_second_moments

    train, _, _ = split("SST-2", 2000, 300)
    spec = infer_spec(train, train, **TASKS["SST-2"][1], max_length=64)
    torch.manual_seed(0)
    model, tokenizer = load_base(minilm_path(), spec.task, 2)
    model = get_peft_model(model, LamdaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                              task_type=TaskType.SEQ_CLS))
    encoded, collate = spec.encode(train, tokenizer), collator_for(spec, tokenizer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    calibration, _ = input_second_moments(model, layers, calibration_batches(encoded, collate, 0), num_batches=8)
    held_out, _ = input_second_moments(model, layers, calibration_batches(encoded, collate, 99), num_batches=8)
    by_kind: dict[str, list[tuple[float, float, float]]] = {}
    for name, layer in layers.items():
        spectral = torch.linalg.qr(layer.lamda_A["default"].double().T).Q  # (d_in, r) orthonormal basis of span(A)
        activations = torch.linalg.eigh(calibration[name]).eigenvectors[:, -r:]
        G = held_out[name]
        energy = lambda P: float(torch.trace(P.T @ G @ P) / torch.trace(G))
        by_kind.setdefault(_kind(name), []).append(
            (energy(spectral), energy(activations), float((spectral.T @ activations).square().sum()) / r))
    result = {kind: {"modules": len(v), "median_input_energy_in_span_A_spectral": float(np.median([x[0] for x in v])),
                     "median_input_energy_in_span_A_activations": float(np.median([x[1] for x in v])),
                     "median_subspace_overlap": float(np.median([x[2] for x in v]))} for kind, v in by_kind.items()}
    (RESULTS / "lamda_ablation_subspace.json").write_text(json.dumps({"r": r, "by_kind": result}, indent=2) + "\n")
    return result
