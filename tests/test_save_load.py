"""Reload is exact and never re-runs the decomposition (issue: foundation, requirement 7)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig

from conftest import make_tiny_gpt2, make_tiny_llama

TESTS = Path(__file__).resolve().parent


def _train_a_little(model, input_ids, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import lamda_peft, lamda_peft.spectral
    from peft import PeftModel
    from conftest import {factory}

    def forbidden(*args, **kwargs):
        raise AssertionError("the decomposition ran while loading an adapter")
    lamda_peft.spectral.top_svd = forbidden
    torch.linalg.svd = forbidden
    torch.svd_lowrank = forbidden

    base = {factory}()
    torch.manual_seed(987654)  # a different global seed than the saving process
    model = PeftModel.from_pretrained(base, {adapter!r})
    ids = torch.load({ids!r})
    torch.save(model(ids).logits, {out!r})
    """
)


@pytest.mark.parametrize("svd_method", ["exact", "randomized"])
@pytest.mark.parametrize("factory", ["make_tiny_llama", "make_tiny_gpt2"])
def test_reload_in_fresh_process_is_exact_without_svd(tmp_path, input_ids, svd_method, factory):
    make = {"make_tiny_llama": make_tiny_llama, "make_tiny_gpt2": make_tiny_gpt2}[factory]
    torch.manual_seed(1)
    config = LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", svd_method=svd_method, svd_niter=2)
    model = _train_a_little(get_peft_model(make(), config), input_ids)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(input_ids, tmp_path / "ids.pt")
    script = RELOAD_SCRIPT.format(tests=str(TESTS), factory=factory, adapter=str(tmp_path / "adapter"),
                                  ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    reloaded = torch.load(tmp_path / "out.pt")
    assert ((reloaded - expected).abs().max() / expected.abs().max()) <= 1e-6


def test_lora_fa_reload_keeps_the_random_A(tmp_path, input_ids):
    model = _train_a_little(get_peft_model(make_tiny_llama(), LoraFAConfig(r=4, target_modules="all-linear")), input_ids)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(4242)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert torch.allclose(loaded(input_ids).logits, expected, rtol=1e-6, atol=1e-7)


def test_get_peft_model_with_a_loaded_config_does_a_fresh_init(tmp_path, input_ids):
    config = LamdaConfig(r=4, target_modules="all-linear")
    trained = _train_a_little(get_peft_model(make_tiny_llama(), config), input_ids)
    trained.save_pretrained(tmp_path)
    loaded_config = LamdaConfig.from_pretrained(tmp_path)
    fresh = get_peft_model(make_tiny_llama(), loaded_config)
    reference = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules="all-linear"))
    assert torch.equal(fresh(input_ids).logits, make_tiny_llama()(input_ids).logits)  # step 0 again
    fresh_sd, reference_sd = fresh.state_dict(), reference.state_dict()
    for key, value in reference_sd.items():
        assert torch.equal(fresh_sd[key], value), key  # same factors, S = I, B = B0 (not the trained ones)


def test_loading_onto_a_base_with_other_shapes_fails_clearly(tmp_path):
    get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"does not fit this base model.*lamda_A"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_saved_files_hold_factors_and_ranks(tmp_path):
    from safetensors.torch import load_file

    config = LamdaConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    get_peft_model(make_tiny_llama(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"v_proj": 2}
    v_key = "base_model.model.model.layers.0.self_attn.v_proj"
    assert tensors[f"{v_key}.lamda_A"].shape == (2, 32) and tensors[f"{v_key}.lamda_B0S0"].shape == (16, 2)
    assert tensors[f"{v_key}.lamda_S"].shape == (2, 2) and tensors[f"{v_key}.lamda_B"].shape == (16, 2)
