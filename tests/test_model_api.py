"""PEFT API contract: trainable counts, structural freezing of A, disable, several adapters, modules_to_save."""

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig, LoraFALayer
from lamda_peft.tuners.base_layer import LowRankDeltaLayer

from conftest import make_tiny_gpt2, make_tiny_llama


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LowRankDeltaLayer)]


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _frozen_factors(model):
    """Every A (and B0S0): they must never require grad and never be parameters."""
    tensors = []
    for layer in _layers(model):
        for name in layer.frozen_factor_names:
            tensors.extend(getattr(layer, name).values())
    return tensors


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_trainable_counts_equal_the_formulas(make_model):
    r = 4
    lamda = get_peft_model(make_model(), LamdaConfig(r=r, target_modules="all-linear"))
    expected = sum(r * r + r * layer.out_features for layer in _layers(lamda))
    assert _trainable(lamda) == expected and len(_layers(lamda)) > 0
    assert lamda.get_nb_trainable_parameters()[0] == expected
    lora_fa = get_peft_model(make_model(), LoraFAConfig(r=r, target_modules="all-linear"))
    assert _trainable(lora_fa) == sum(r * layer.out_features for layer in _layers(lora_fa))


def test_rank_pattern_sets_per_module_ranks():
    model = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    ranks = {name.split(".")[-1]: layer.r["default"] for name, layer in model.named_modules() if isinstance(layer, LamdaLayer)}
    assert ranks == {"q_proj": 4, "v_proj": 2}
    assert _trainable(model) == 2 * ((16 + 4 * 32) + (4 + 2 * 16))


@pytest.mark.parametrize("config_cls", [LamdaConfig, LoraFAConfig])
def test_frozen_factors_never_become_trainable(config_cls, tmp_path, input_ids):
    from peft import PeftModel

    model = get_peft_model(make_tiny_llama(), config_cls(r=4, target_modules="all-linear"))
    expected_trainable = _trainable(model)

    def check():
        assert all(not t.requires_grad for t in _frozen_factors(model))
        assert not any(p is t for p in model.parameters() for t in _frozen_factors(model))

    check()
    with model.disable_adapter():
        model(input_ids)
    check()
    model.base_model.enable_adapter_layers()
    model.set_adapter("default")
    check()
    model.add_adapter("second", config_cls(r=2, target_modules="all-linear"))
    model.set_adapter("second")
    check()
    model.set_adapter("default")
    check()
    assert _trainable(model) == expected_trainable  # only the active adapter's S and B
    model.delete_adapter("second")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    assert all(not t.requires_grad for t in _frozen_factors(loaded))
    assert _trainable(loaded) == expected_trainable


def test_disable_gives_back_the_pretrained_model_and_adapters_do_not_interfere(input_ids):
    reference = make_tiny_llama()(input_ids).logits
    model = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules="all-linear"))
    model.add_adapter("other", LamdaConfig(r=2, target_modules=["q_proj"], init="random"))
    with torch.no_grad():
        for layer in _layers(model):
            for adapter in layer.r:
                layer.lamda_B[adapter].add_(0.05 * torch.randn_like(layer.lamda_B[adapter]))
    out_default = model(input_ids).logits
    assert not torch.allclose(out_default, reference)
    with model.disable_adapter():
        assert torch.equal(model(input_ids).logits, reference)
    model.set_adapter("other")
    out_other = model(input_ids).logits
    # the "other" adapter alone, built independently on a fresh base, gives the same output
    only_other = get_peft_model(make_tiny_llama(), LamdaConfig(r=2, target_modules=["q_proj"], init="random"))
    only_other.load_state_dict(
        {k.replace(".other", ".default"): v for k, v in model.state_dict().items() if ".other" in k}, strict=False
    )
    assert torch.allclose(out_other, only_other(input_ids).logits, atol=1e-6)
    model.set_adapter("default")
    assert torch.equal(model(input_ids).logits, out_default)


def test_modules_to_save_head_trains_and_is_saved(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    base = BertForSequenceClassification(config).eval()
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"))
    head = model.base_model.model.classifier
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    ids = torch.randint(0, 64, (2, 6))
    out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(config).eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.allclose(loaded(input_ids=ids).logits, out, atol=1e-6)


def test_trainer_writes_adapter_only_checkpoints(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, 128, (8, 9), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "adapter_config.json").exists()
    assert not (checkpoint / "model.safetensors").exists()
    from safetensors.torch import load_file

    keys = load_file(checkpoint / "adapter_model.safetensors").keys()
    assert keys and all(any(part in k for part in ("lamda_A", "lamda_B", "lamda_S", "lamda_B0S0")) for k in keys)
