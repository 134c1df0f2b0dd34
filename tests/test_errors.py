"""Bad input gets a clear error that names the problem and the fix (issue: foundation, requirement 10)."""

import pytest
import torch
from peft import get_peft_model

from lamda_peft import LamdaConfig, LoraFAConfig

from conftest import make_tiny_llama


def test_no_module_matched():
    with pytest.raises(ValueError, match=r"(?i)target modules.*not found"):
        get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules=["does_not_exist"]))


@pytest.mark.parametrize("config_cls", [LamdaConfig, LoraFAConfig])
def test_rank_larger_than_the_layer(config_cls):
    with pytest.raises(ValueError, match=r"k_proj: r=20 exceeds min\(d_in, d_out\) = min\(32, 16\).*rank_pattern"):
        get_peft_model(make_tiny_llama(), config_cls(r=20, target_modules=["k_proj"]))


def test_non_finite_weight_names_the_module():
    base = make_tiny_llama()
    with torch.no_grad():
        base.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: the weight holds NaN or Inf.*exclude_modules"):
        get_peft_model(base, LamdaConfig(r=4, target_modules=["q_proj"]))


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match=r"embed_tokens: unsupported layer type Embedding.*nn.Linear.*Conv1D"):
        get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules=["embed_tokens"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha must be > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(init="pissa"), "init='pissa' is not supported; choose one of 'spectral'"),
        (dict(svd_method="qr"), "svd_method='qr' is not supported"),
        (dict(freeze_ratio=1.5), r"freeze_ratio must be in \[0, 1\]"),
        (dict(freeze_order="random"), "freeze_order='random' is not supported"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_config_values_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LamdaConfig(**kwargs)


def test_lora_fa_config_values_out_of_range():
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        LoraFAConfig(lora_alpha=-1)


@pytest.mark.parametrize("config_cls", [LamdaConfig, LoraFAConfig])
@pytest.mark.parametrize("targets", ["all-linear", r".*\.q_proj"])
def test_layer_selection_with_a_string_target_is_refused(config_cls, targets):
    """Audit (issue 13.3): PEFT ignores layers_to_transform when target_modules is a string; stock LoraConfig refuses
    it, and so must we (it used to adapt every layer silently)."""
    with pytest.raises(ValueError, match=r"layers_to_transform cannot be used when target_modules is a string.*List"):
        config_cls(r=4, target_modules=targets, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_pattern cannot be used when target_modules is a string"):
        config_cls(r=4, target_modules=targets, layers_pattern="layers")
    with pytest.raises(ValueError, match=r"layers_pattern only applies together with layers_to_transform"):
        config_cls(r=4, target_modules=["q_proj"], layers_pattern="layers")


def test_layers_to_transform_with_listed_targets_is_honoured():
    model = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]))
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "lamda_A")]
    assert wrapped == ["base_model.model.model.layers.1.self_attn.q_proj"]
