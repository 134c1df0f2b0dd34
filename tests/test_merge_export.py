"""Merge/unmerge round trips and export to a stock PEFT LoRA adapter (no rank doubling)."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lamda_peft import LamdaConfig, LoraFAConfig, export_lora

from conftest import make_tiny_gpt2, make_tiny_llama

FACTORIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def _trained(make, config, input_ids):
    model = get_peft_model(make(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CONFIGS = {
    "lamda": lambda: LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "lamda_pattern": lambda: LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"c_attn|q_proj": 2},
                                         alpha_pattern={"mlp.*": 4}),
    "lorafa": lambda: LoraFAConfig(r=4, lora_alpha=8, target_modules="all-linear"),
}


@pytest.mark.parametrize("arch", FACTORIES)
@pytest.mark.parametrize("method", CONFIGS)
def test_merge_unmerge_round_trip(arch, method, input_ids):
    model = _trained(FACTORIES[arch], CONFIGS[method](), input_ids)
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "base_layer" in k}
    expected = model(input_ids).logits
    model.merge_adapter()
    assert _rel(model(input_ids).logits, expected) <= 1e-5
    model.unmerge_adapter()
    after = model.base_model.model.state_dict()
    for key, value in before.items():
        assert torch.allclose(after[key], value, atol=1e-6), key
    assert _rel(model(input_ids).logits, expected) <= 1e-5
    merged = model.merge_and_unload()
    assert _rel(merged(input_ids).logits, expected) <= 1e-5
    assert not any("lamda_" in n or "lorafa_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("arch", FACTORIES)
@pytest.mark.parametrize("method", CONFIGS)
def test_export_is_a_stock_lora_adapter_at_rank_r(arch, method, input_ids, tmp_path):
    config = CONFIGS[method]()
    model = _trained(FACTORIES[arch], config, input_ids)
    expected = model(input_ids).logits
    export_lora(model, tmp_path / "lora")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
    assert a_keys and all(tensors[k].shape[0] in (2, 4) for k in a_keys)  # rank r (per module), no doubling
    loaded = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "lora")  # an unmodified base
    assert isinstance(loaded.peft_config["default"], LoraConfig)
    assert _rel(loaded(input_ids).logits, expected) <= 1e-5


def test_export_refuses_merged_or_unknown_adapters(input_ids, tmp_path):
    model = _trained(make_tiny_llama, CONFIGS["lamda"](), input_ids)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        export_lora(model, tmp_path / "x", adapter_name="nope")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        export_lora(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_replaces_an_existing_folder_only_when_complete(input_ids, tmp_path, monkeypatch):
    model = _trained(make_tiny_llama, CONFIGS["lamda"](), input_ids)
    target = tmp_path / "lora"
    export_lora(model, target)
    original = (target / "adapter_model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lamda_peft.export.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_lora(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == original  # the old export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no temporary folder left behind


def test_export_carries_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    model = get_peft_model(BertForSequenceClassification(config).eval(),
                           LamdaConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].bias.add_(0.5)
        for name, p in model.named_parameters():
            if "lamda_B" in name:
                p.add_(0.1)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(input_ids=ids).logits
    export_lora(model, tmp_path / "lora")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(BertForSequenceClassification(config).eval(), tmp_path / "lora")
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
