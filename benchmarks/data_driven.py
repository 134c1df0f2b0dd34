"""The benchmarks' data-driven methods (issue 24; glue.py, gsm8k.py): each builds its adapter from a few training
batches.

    lamda-gradient     LaMDA, ``init="gradient"`` (``lamda_peft.initialize``: A and B0 span the top-r singular
                       subspaces of the loss gradient wrt W0, from a randomized sketch), ``freeze_ratio=0.7``: the best
                       LaMDA setting of the ablation at 400 steps (docs/results/lamda_ablation.md, "Session 10")
    lamda++-gradient   the same with LaMDA++'s energy-based ranks
    lora-ga            PEFT's LoRA-GA (``init_lora_weights="lora_ga"``, ``LoraGAConfig()``'s defaults: A and B from
                       the SVD of the full gradient, ArB2r, stable scale, gamma 16; the base weight absorbs -s B A)
    eva                PEFT's EVA (``init_lora_weights="eva"``, ``EvaConfig()``'s defaults, rho 2: A from the SVD of
                       the layer inputs, ranks redistributed by explained variance; no label mask, the labels of a
                       classifier are one per row)
    corda              PEFT's CorDA, instruction-previewed (``corda_method="ipm"``: the top-r singular directions of W C,
                       C the inputs' covariance; the task-adaptation mode, where "kpm" preserves knowledge); its
                       covariance hook takes one example per forward, so the 128 rows run one by one, unpadded

Every method calibrates on the same data: ``CALIBRATION_BATCHES`` shuffled training batches of the benchmark's batch
size (GLUE: 128 rows, the ablation's default calibration size; GSM8K: 32 problems), seeded with the run's seed, with
their labels (for a causal LM, the response tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from ablation_common import calibration_batches
from lamda_peft.cli.eval import collator_for

DATA_DRIVEN = ("lamda-gradient", "lamda++-gradient", "lora-ga", "eva", "corda")
# How each trains once built (the CLI's training keys its optimizer groups and B's freezing on the method's name):
# LaMDA's per-group rates (S at 5x) and LamdaCallback, or the Trainer's AdamW as for LoRA.
TRAINED_AS = {"lamda-gradient": "lamda", "lamda++-gradient": "lamda++", "lora-ga": "lora", "eva": "lora",
              "corda": "lora"}
CALIBRATION_BATCHES = 8
GRADIENT_FREEZE_RATIO = 0.7


def _eva_layer_inputs(layer_input: Any, token_index: torch.Tensor, layer_name: str) -> torch.Tensor:
    """EVA's default (the layer's inputs at the unpadded tokens), except for a layer fed one vector per row (BERT's
    pooler sees the first token only), whose rows are all kept."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.contiguous() if x.dim() == 2 else x[token_index.T.unbind()]  # EVA hashes it with .view(-1)


def calibration_data(spec: Any, tokenizer: Any, train_ds: Any, batch_size: int, seed: int) -> list[dict]:
    """The calibration batches of every method: ``CALIBRATION_BATCHES`` seeded, shuffled training batches."""
    return calibration_batches(train_ds, collator_for(spec, tokenizer), seed, CALIBRATION_BATCHES, batch_size)


def build(method: str, model: torch.nn.Module, batches: list[dict], r: int, seed: int,
          task_type: str = "SEQ_CLS") -> torch.nn.Module:
    """``model`` (the base, its head initialised) wrapped with ``method``'s adapter, calibrated on ``batches`` (dicts
    of tensors with labels, as the model takes them)."""
    from peft import (EvaConfig, LoraConfig, LoraGAConfig, TaskType, get_peft_model, initialize_lora_eva_weights,
                      preprocess_loraga)
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from lamda_peft import LamdaConfig, initialize

    if method not in DATA_DRIVEN:
        raise ValueError(f"{method!r} is not one of the data-driven methods {DATA_DRIVEN}")
    common = dict(r=r, lora_alpha=2.0 * r, target_modules="all-linear", lora_dropout=0.0, task_type=TaskType[task_type])
    if method in ("lamda-gradient", "lamda++-gradient"):
        energy = {"rank_allocation": "energy"} if method == "lamda++-gradient" else {}
        peft_model = get_peft_model(model, LamdaConfig(**common, init="gradient", freeze_ratio=GRADIENT_FREEZE_RATIO,
                                                       **energy))
        initialize(peft_model, batches, num_batches=len(batches), seed=seed)
        return peft_model
    if method == "eva":
        peft_model = get_peft_model(model, LoraConfig(**common, init_lora_weights="eva",
                                                      eva_config=EvaConfig(use_label_mask=False)),
                                    low_cpu_mem_usage=True)
        initialize_lora_eva_weights(peft_model, [dict(b) for b in batches], show_progress_bar=False,  # needs dicts
                                    prepare_layer_inputs_fn=_eva_layer_inputs)
        return peft_model
    # LoRA-GA and CorDA preprocess the base model before wrapping it; their target matching does not expand the
    # "all-linear" shorthand, so they get the names it stands for (the same modules as every other method).
    if method == "lora-ga":
        config = _maybe_include_all_linear_layers(LoraConfig(**common, init_lora_weights="lora_ga",
                                                             lora_ga_config=LoraGAConfig()), model)

        def train_step() -> None:
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
    else:
        config = _maybe_include_all_linear_layers(LoraConfig(**common, init_lora_weights="corda",
                                                             corda_config=CordaConfig(corda_method="ipm")), model)

        def run_model() -> None:  # CorDA's hook takes one unpadded example per forward (it squeezes the batch)
            for batch in batches:
                for row in range(len(batch["input_ids"])):
                    keep = batch["attention_mask"][row].bool()
                    model(**{k: v[row][keep][None] for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                                         "token_type_ids")})

        # CorDA's hook squeezes the batch away: BERT's pooler then sees a (hidden,) vector and its covariance fails.
        # Feeding the pooler (1, 1, hidden) during the calibration keeps its one row a (1, hidden) matrix.
        pooler = getattr(getattr(model, "bert", None), "pooler", None)
        handle = pooler.dense.register_forward_pre_hook(lambda m, args: (args[0][None],)) if pooler else None
        preprocess_corda(model, config, run_model=run_model)
        if handle is not None:
            handle.remove()
    return get_peft_model(model, config)
