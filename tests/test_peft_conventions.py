"""PEFT conventions our tuners follow as PEFT's own tuners do (issue 25): the ``init_weights`` switch,
``autocast_adapter_dtype``, the ``safe_merge`` error, and the caller's config object kept by LaMDA++."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lamda_peft.allocation
import lamda_peft.tuners.lamda.layer
import lamda_peft.tuners.lora_fa.layer
from lamda_peft import LamdaConfig, LoraFAConfig

from conftest import make_tiny_llama

TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lamda": lambda **kw: LamdaConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw),
    "lamda_random": lambda **kw: LamdaConfig(r=4, target_modules=TARGETS, init="random", **kw),
    "lamdapp": lambda **kw: LamdaConfig(r=4, target_modules=TARGETS, rank_allocation="energy", **kw),
    "lorafa": lambda **kw: LoraFAConfig(r=4, target_modules=TARGETS, **kw),
}


def _is_factor(key: str, adapter: str) -> bool:
    return key.endswith(f".{adapter}") and key.split(".")[-2].startswith(("lamda_", "lorafa_"))


def _factors(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{state_dict key: tensor} of the adapter's factors (A, B0S0, S, B)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if _is_factor(k, adapter)}


def _trainable(name: str) -> bool:
    return name.split(".")[-2] in ("lamda_S", "lamda_B", "lorafa_B")


# -- init_weights ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CONFIGS)
def test_init_weights_false_perturbs_only_the_trained_factors(kind, input_ids):
    identity = get_peft_model(make_tiny_llama(), CONFIGS[kind]())  # make_tiny_llama seeds: A draws the same
    perturbed = get_peft_model(make_tiny_llama(), CONFIGS[kind](init_weights=False))
    base = make_tiny_llama()(input_ids).logits
    torch.testing.assert_close(identity(input_ids).logits, base, rtol=0, atol=0)
    assert (perturbed(input_ids).logits - base).abs().max() > 1e-2  # visibly not the base model

    start, moved = _factors(identity), _factors(perturbed)
    assert start.keys() == moved.keys()
    for key, value in moved.items():
        if not _trainable(key):  # A and B0S0: the init as it is
            torch.testing.assert_close(value, start[key], rtol=0, atol=0)
            continue
        r = value.shape[-1]
        difference = (value - start[key]).abs()
        assert 0 < difference.max() <= 1 / math.sqrt(r)  # U(-1/sqrt(r), 1/sqrt(r)), LoRA's B with init False


@pytest.mark.parametrize("kind", ["lamda", "lorafa"])
def test_init_weights_false_is_seeded_per_module_and_adapter(kind):
    first = get_peft_model(make_tiny_llama(), CONFIGS[kind](init_weights=False))
    first.add_adapter("other", CONFIGS[kind](init_weights=False))
    base = make_tiny_llama()
    torch.manual_seed(99)  # another global RNG state: the perturbation has its own generator
    second = get_peft_model(base, CONFIGS[kind](init_weights=False))
    B = "lamda_B" if kind == "lamda" else "lorafa_B"
    for name, value in _factors(first).items():
        if name.split(".")[-2] == B:
            torch.testing.assert_close(value, _factors(second)[name], rtol=0, atol=0)  # same in every process
            assert not torch.equal(value, _factors(first, "other")[name.replace(".default", ".other")])
    layers = first.base_model.model.model.layers
    assert not torch.equal(layers[0].self_attn.q_proj.get_parameter(f"{B}.default"),
                           layers[1].self_attn.q_proj.get_parameter(f"{B}.default"))


@pytest.mark.parametrize("kind", CONFIGS)
def test_init_weights_false_survives_save_and_is_not_applied_again_on_load(kind, input_ids, tmp_path, monkeypatch):
    model = get_peft_model(make_tiny_llama(), CONFIGS[kind](init_weights=False))
    with torch.no_grad():  # a trained-looking S/B: a second perturbation on load would show
        for name, p in model.named_parameters():
            if _trainable(name):
                p.add_(0.01)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_weights"] is False

    calls = []
    for module in (lamda_peft.tuners.lamda.layer, lamda_peft.tuners.lora_fa.layer):
        real = module.perturb_for_non_identity_start
        monkeypatch.setattr(module, "perturb_for_non_identity_start",
                            lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=0, atol=0)
    assert calls == []


def test_init_weights_values_are_checked():
    assert LamdaConfig().init_weights is True and LoraFAConfig().init_weights is True
    with pytest.raises(ValueError, match="init_weights must be True"):
        LoraFAConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="init_weights=False cannot be combined with init='activations'"):
        LamdaConfig(init="activations", init_weights=False)


# -- autocast_adapter_dtype --------------------------------------------------------------------------------------
def _dtypes(model, adapter: str) -> dict[str, torch.dtype]:
    """{container: dtype} of one adapter's factors, parameters and buffers."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name.split(".")[-2]: tensor.dtype for name, tensor in tensors if _is_factor(name, adapter)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("kind", ["lamda", "lorafa"])
def test_autocast_adapter_dtype_is_honoured(kind, dtype, autocast, input_ids, tmp_path):
    trained = dtype if not autocast else torch.float32  # PEFT's rule for LoRA's weights
    config = CONFIGS[kind]()
    model = get_peft_model(make_tiny_llama(dtype=dtype), config, autocast_adapter_dtype=autocast)
    model.add_adapter("other", CONFIGS[kind](), autocast_adapter_dtype=autocast)
    for adapter in ("default", "other"):
        dtypes = _dtypes(model, adapter)
        assert dtypes.pop(f"{kind}_A") == dtype  # A: the base dtype, always
        assert set(dtypes.values()) == {trained}, dtypes
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)  # the cast kept it frozen
    torch.testing.assert_close(model(input_ids).logits, make_tiny_llama(dtype=dtype)(input_ids).logits, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(make_tiny_llama(dtype=dtype), tmp_path, autocast_adapter_dtype=autocast,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=autocast,
                            low_cpu_mem_usage=low_cpu_mem_usage)
        for adapter in ("default", "other"):
            assert {p.dtype for n, p in loaded.named_parameters() if f".{adapter}" in n} == {trained}


def test_adapter_in_the_base_dtype_trains(input_ids):
    model = get_peft_model(make_tiny_llama(dtype=torch.bfloat16), CONFIGS["lamda"](init_weights=False),
                           autocast_adapter_dtype=False).train()
    model(input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.bfloat16 and g.abs().sum() > 0 for g in grads.values())


# -- safe_merge --------------------------------------------------------------------------------------------------
def _broken_merge_message(config, adapter: str, parameter: str) -> str:
    """The error of ``merge_and_unload(safe_merge=True)`` after ``parameter`` of one layer is set to NaN."""
    model = get_peft_model(make_tiny_llama(), config, adapter_name=adapter)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.get_parameter(parameter).fill_(float("nan"))
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError) as error:
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)  # nothing merged
    return str(error.value)


@pytest.mark.parametrize("kind", ["lamda", "lorafa"])
def test_safe_merge_refuses_with_peft_loras_message(kind):
    ours = _broken_merge_message(CONFIGS[kind](), "mine", "lamda_S.mine" if kind == "lamda" else "lorafa_B.mine")
    loras = _broken_merge_message(LoraConfig(r=4, target_modules=TARGETS), "mine", "lora_B.mine.weight")  # reference
    assert ours == loras == "NaNs detected in the merged weights. The adapter mine seems to be broken"


# -- LaMDA++ keeps the caller's config ---------------------------------------------------------------------------
def test_lamdapp_writes_its_allocation_into_the_callers_config(input_ids, tmp_path, monkeypatch):
    config = CONFIGS["lamdapp"]()
    model = get_peft_model(make_tiny_llama(), config)
    assert model.peft_config["default"] is config  # as PEFT's own methods
    assert len(config.rank_pattern) == 4 and sum(config.rank_pattern.values()) == config.rank_budget == 16
    model.save_pretrained(tmp_path)
    expected = model(input_ids).logits

    def forbidden(*args, **kwargs):
        raise AssertionError("the LaMDA++ allocation ran again")

    monkeypatch.setattr(lamda_peft.allocation, "top_svds", forbidden)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, config=config)
    assert reloaded.peft_config["default"] is config
    torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=0, atol=0)
    model.add_adapter("again", config)  # the same object, reused as is
    assert model.base_model.model.model.layers[1].self_attn.v_proj.r["again"] == config.rank_pattern[
        r"^model\.layers\.1\.self_attn\.v_proj$"]


def test_a_failed_injection_gives_the_config_its_fields_back(monkeypatch):
    import lamda_peft.tuners.base_model as base_model

    def fail(*args, **kwargs):
        raise RuntimeError("injection failed")

    monkeypatch.setattr(base_model, "_check_allocated_modules_were_wrapped", fail)
    config = CONFIGS["lamdapp"]()
    with pytest.raises(RuntimeError, match="injection failed"):
        get_peft_model(make_tiny_llama(), config)
    assert (config.rank_pattern, config.r_min, config.r_max, config.rank_budget) == ({}, None, None, None)


# -- mixed adapter batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lamda", "lorafa"])
def test_mixed_adapter_batches_are_refused_not_ignored(kind, input_ids):
    model = get_peft_model(make_tiny_llama(), CONFIGS[kind](init_weights=False)).eval()
    with pytest.raises(ValueError, match=r"adapter_names \(mixed adapter batches\) is not supported"):
        model(input_ids, adapter_names=["default", "__base__"])  # PEFT alone would run both rows through "default"
    with pytest.raises(ValueError, match="is not supported"):
        model.generate(input_ids=input_ids, adapter_names=["default", "__base__"], max_new_tokens=1)
