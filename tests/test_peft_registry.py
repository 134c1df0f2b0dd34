"""The PeftType extension (src/lamda_peft/_peft_registry.py): the one place that touches PEFT internals."""

import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import lamda_peft
from lamda_peft import LamdaConfig, LamdaModel, LoraFAConfig, LoraFAModel
from lamda_peft._peft_registry import peft_type, register


@pytest.mark.parametrize(
    "name, config_cls, model_cls, prefix",
    [("LAMDA", LamdaConfig, LamdaModel, "lamda_"), ("LORAFA", LoraFAConfig, LoraFAModel, "lorafa_")],
)
def test_methods_are_registered(name, config_cls, model_cls, prefix):
    member = PeftType(name)  # the JSON value finds the enum member
    assert member.value == name and member in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is config_cls  # plain str lookup, as PEFT does when loading JSON
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix


def test_registration_is_idempotent():
    before = list(PeftType)
    assert register("lamda", LamdaConfig, LamdaModel, prefix="lamda_") is PeftType.LAMDA
    assert peft_type("LAMDA") is PeftType.LAMDA
    assert list(PeftType) == before  # no duplicate member


def test_config_json_round_trip(tmp_path):
    LamdaConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init="spectral_zero").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LAMDA" and saved["init"] == "spectral_zero"
    loaded = PeftConfig.from_pretrained(tmp_path)  # generic entry point dispatches on peft_type
    assert isinstance(loaded, LamdaConfig) and loaded.r == 4 and loaded.init == "spectral_zero"


def test_pinned_peft_version():
    import peft

    major, minor = (int(part) for part in peft.__version__.split(".")[:2])
    assert (major, minor) == (0, 21), "the PeftType extension is tested with peft 0.21.x (see pyproject.toml)"
    assert lamda_peft.__version__
