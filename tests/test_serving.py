"""export_lora writes adapters that vLLM serves with the numbers PEFT uses (lamda_peft.serving has vLLM's rules).

The reference for "what vLLM computes" is the reading of older vLLM versions, written out here: every module scaled
by ``lora_alpha / r`` from the config, rank_pattern and alpha_pattern ignored. Newer vLLM reads the patterns like
PEFT, which stock ``PeftModel`` checks.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lamda_peft import LamdaConfig, LoraFAConfig, export_lora
from lamda_peft.serving import smallest_max_lora_rank, vllm_problems
from lamda_peft.tuners.base_layer import LowRankDeltaLayer

from conftest import make_tiny_llama

CONFIGS = {
    "lamda": lambda: LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "patterns": lambda: LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2, "up_proj": 6},
                                    alpha_pattern={"mlp.*": 3, "v_proj": 16}),
    "lamda++": lambda: LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_allocation="energy"),
    "lorafa": lambda: LoraFAConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 8}),
}


def trained(config, input_ids):
    model = get_peft_model(make_tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", CONFIGS)
def test_export_follows_vllms_rules_and_keeps_every_scaling(method, input_ids, tmp_path):
    model = trained(CONFIGS[method](), input_ids)
    export_lora(model, tmp_path / "lora", for_vllm=True)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert vllm_problems(config) == []
    assert config["bias"] == "none" and not config["use_dora"] and not config.get("modules_to_save")
    ranks = {key: t.shape[0] for key, t in tensors.items() if key.endswith("lora_A.weight")}
    assert config["r"] == max(ranks.values())
    assert smallest_max_lora_rank(config["r"]) >= config["r"]
    # the "lora_alpha / r everywhere" reading gives each module's own delta W exactly
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankDeltaLayer)}
    assert len(layers) == len(ranks) == 14
    for name, layer in layers.items():
        A, B = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
        delta = config["lora_alpha"] / config["r"] * B @ A
        assert torch.allclose(delta, layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-7), name
    with torch.no_grad():
        expected = model(input_ids).logits
        loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora")  # stock PEFT, unmodified base
        assert torch.allclose(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_vllm_problems_name_each_rule():
    ok = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}
    assert vllm_problems(ok) == [] and vllm_problems(ok, max_lora_rank=8) == []
    cases = {
        "modules_to_save": {"modules_to_save": ["lm_head"]},
        "bias='all'": {"bias": "all"},
        "use_dora": {"use_dora": True},
        "modifies the base weights": {"init_lora_weights": "pissa"},
        "scales by 4, not lora_alpha / r = 2": {"alpha_pattern": {"q_proj": 32}},
        "rank 16 is above max_lora_rank 8": {"rank_pattern": {"q_proj": 16}, "alpha_pattern": {"q_proj": 32}},
        "peft_type is 'LAMDA'": {"peft_type": "LAMDA"},
    }
    for fragment, change in cases.items():
        problems = vllm_problems({**ok, **change}, max_lora_rank=8)
        assert len(problems) == 1 and fragment in problems[0], (fragment, problems)
    assert vllm_problems({**ok, "modules_to_save": ["classifier", "score"]}) == []  # vLLM's classification heads
    assert "not one vLLM accepts" in vllm_problems(ok, max_lora_rank=12)[0]
    assert smallest_max_lora_rank(9) == 16 and smallest_max_lora_rank(600) is None


def test_export_for_vllm_refuses_a_generation_head_and_writes_nothing(input_ids, tmp_path):
    config = LamdaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = trained(config, input_ids)
    with pytest.raises(ValueError, match="cannot be served by vLLM.*modules_to_save"):
        export_lora(model, tmp_path / "lora", for_vllm=True)
    assert not (tmp_path / "lora").exists()
    export_lora(model, tmp_path / "lora")  # for PEFT the head is carried over
    assert any("lm_head" in k for k in load_file(tmp_path / "lora" / "adapter_model.safetensors"))
