"""``lamda-peft export`` and ``lamda-peft merge`` (cli/export.py): the adapter as a stock PEFT LoRA adapter, or merged
into its base, reproduce the adapted model's outputs; bad input is refused with nothing written."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from lamda_peft import LamdaConfig, LoraFAConfig
from lamda_peft.cli import main

from conftest import make_tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture
def base_dir(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("config", [LamdaConfig(r=4, target_modules="all-linear", init_weights=False),
                                    LoraFAConfig(r=4, target_modules="all-linear", init_weights=False)],
                         ids=["lamda", "lora-fa"])
def test_export_and_merge_reproduce_the_adapted_model(config, base_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)  # a non-identity adapter
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(base_dir)))
    model.save_pretrained(tmp_path / "adapter")  # names base_dir as its base
    assert main(["export", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "lora")]) == 0
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(_logits(lora), expected, rtol=1e-5, atol=1e-5)
    assert main(["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_merge_keeps_a_trained_classification_head(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                           LamdaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                       init_weights=False))
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)  # a head that differs from the base's
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 3
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_and_nothing_is_written(base_dir, tmp_path, capsys):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LamdaConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    cases = [(["export", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "x")], "no adapter_config.json"),
             (["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "taken")], "already exists"),
             (["export", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "y"), "--model",
               str(tmp_path / "no-base")], "no such folder")]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "taken"]
    assert not any((tmp_path / "taken").iterdir())
