"""Our configs in the formats of PEFT's test tables, one entry per case, each with a readable test id.

Ranks: LaMDA's spectral init needs r <= min(d_in, d_out), so a case targeting MLP's lin1 (20 -> 2) uses r <= 2 and
the Conv1D of EmbConv1D (5 -> 1) r = 1; PEFT's own cases for LoRA leave r at 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lamda_peft import LamdaConfig, LoraFAConfig

from . import models


@dataclass(frozen=True)
class Case:
    id: str
    values: tuple[Any, ...]


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("+", "p")


def _custom(name: str, model: str, cls: type, kwargs: dict[str, Any]) -> Case:
    return Case(_slug(name), (name, model, cls, kwargs))


LAMDA_PP = {"rank_allocation": "energy"}

# test_custom_models.TEST_CASES: (test name, model id, config class, config kwargs)
CUSTOM_MODEL_CASES = [
    _custom("MLP 1 LaMDA", "MLP", LamdaConfig, {"target_modules": "lin0", "r": 4}),
    _custom("MLP 2 LaMDA", "MLP", LamdaConfig, {"target_modules": ["lin0"], "r": 4}),
    _custom("MLP 3 LaMDA", "MLP", LamdaConfig, {"target_modules": ["lin1"], "r": 2}),
    _custom("MLP 4 LaMDA", "MLP", LamdaConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    _custom("MLP 5 LaMDA", "MLP", LamdaConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4}),
    _custom("MLP 6 LaMDA", "MLP", LamdaConfig,
            {"target_modules": ["lin0"], "r": 4, "lora_alpha": 4, "lora_dropout": 0.1}),
    _custom("MLP 7 LaMDA spectral_zero", "MLP", LamdaConfig, {"target_modules": ["lin0"], "init": "spectral_zero"}),
    _custom("MLP 8 LaMDA random", "MLP", LamdaConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "init": "random"}),
    _custom("MLP 9 LaMDA randomized SVD", "MLP", LamdaConfig, {"target_modules": ["lin0"], "svd_method": "randomized"}),
    _custom("MLP 10 LaMDA++", "MLP", LamdaConfig,
            {"target_modules": ["lin0", "lin1"], "r": 2, "r_min": 1, "r_max": 2, **LAMDA_PP}),
    _custom("EmbConv1D LaMDA", "EmbConv1D", LamdaConfig, {"target_modules": ["conv1d"], "r": 1}),
    _custom("MLP 1 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": "lin0"}),
    _custom("MLP 2 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": ["lin0"]}),
    _custom("MLP 3 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": ["lin1"], "r": 2}),
    _custom("MLP 4 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    _custom("MLP 5 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    _custom("MLP 6 LoRA-FA", "MLP", LoraFAConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    _custom("MLP 7 LoRA-FA v2", "MLP", LoraFAConfig,
            {"target_modules": ["lin0", "lin1"], "r": 2, "grad_correction": True}),
    _custom("EmbConv1D LoRA-FA", "EmbConv1D", LoraFAConfig, {"target_modules": ["conv1d"], "r": 1}),
]

# test_custom_models.ALL_PEFT_CONFIG_CLASSES: the tests build config_cls(target_modules=...) themselves
CONFIG_CLASSES = [Case("LamdaConfig", (LamdaConfig,)), Case("LoraFAConfig", (LoraFAConfig,))]


def _two(name: str, cls: type, first: dict[str, Any], second: dict[str, Any]) -> Case:
    perturbed = {"init_weights": False}  # PEFT's cases start every adapter away from the identity
    return Case(_slug(name), (name, "lamda", cls, {**first, **perturbed}, {**second, **perturbed}))


# test_custom_models.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: (name, tuner method, class, kwargs 1, kwargs 2) on MLP
MULTIPLE_ADAPTER_CASES = [
    _two("LaMDA Same", LamdaConfig, {"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}),
    _two("LaMDA Different", LamdaConfig, {"target_modules": ["lin0"]}, {"target_modules": ["lin1"], "r": 2}),
    _two("LaMDA++ Same", LamdaConfig, {"target_modules": ["lin0"], "r": 4, **LAMDA_PP},
         {"target_modules": ["lin0"], "r": 4, **LAMDA_PP}),
    _two("LoRA-FA Same", LoraFAConfig, {"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}),
    _two("LoRA-FA Different", LoraFAConfig, {"target_modules": ["lin0"]}, {"target_modules": ["lin1"], "r": 2}),
]


# test_custom_models.MIXED_ADAPTER_TEST_CASES: (name, config 0, config 1), two adapters on MLP's lin0
MIXED_BATCH_CASES = [
    Case("lamda", ("LaMDA mixed adapter", LamdaConfig(target_modules=["lin0"], r=4, init_weights=False),
                   LamdaConfig(target_modules=["lin0"], r=8, init_weights=False))),
    Case("lorafa", ("LoRA-FA mixed adapter", LoraFAConfig(target_modules=["lin0"], init_weights=False),
                    LoraFAConfig(target_modules=["lin0"], r=10, init_weights=False))),
]


def _task(task_type: str) -> list[Case]:
    """(config class, kwargs) on a transformers model with PEFT's default target modules (target_modules=None)."""
    common = {"task_type": task_type, "target_modules": None, "r": 4}
    return [Case("lamda", (LamdaConfig, dict(common))), Case("lamdapp", (LamdaConfig, {**common, **LAMDA_PP})),
            Case("lorafa", (LoraFAConfig, dict(common)))]  # one dict per case: a test may change its kwargs


DECODER_CASES = _task("CAUSAL_LM")
SEQ_CLS_CASES = _task("SEQ_CLS")
# the model tables: PEFT's Hub ids mapped to their offline stand-ins, with the Hub name as the test id
DECODER_MODELS = [Case(hub_id.split("/")[-1], (str(models.local_path(hub_id)),)) for hub_id in models.DECODERS]
SEQ_CLS_MODELS = [Case(hub_id.split("/")[-1], (str(models.local_path(hub_id)),)) for hub_id in models.SEQ_CLS]

# test_config.ALL_CONFIG_CLASSES (and LAYER_INDEXING_CONFIG_CLASSES): (config class, mandatory kwargs)
CONFIG_CASES = [Case("LamdaConfig", (LamdaConfig, {})), Case("LamdaConfig-energy", (LamdaConfig, LAMDA_PP)),
                Case("LoraFAConfig", (LoraFAConfig, {}))]
