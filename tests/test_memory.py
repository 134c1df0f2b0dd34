"""lamda_peft.memory: the accounting against hand counts, the estimate against the measurement."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lamda_peft import LamdaConfig
from lamda_peft.memory import (
    adapter_trainable_parameters,
    estimate_training_step,
    lamda_average_updates,
    measure_training_step,
)

N, D_IN, D_HID, D_OUT, R = 5, 8, 16, 4, 2


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def square_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(batch["x"]) ** 2).sum()


def two_layer(config) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(TwoLayer(), config)


def test_lamda_step_matches_hand_count():
    model = two_layer(LamdaConfig(r=R, target_modules=["fc1", "fc2"], init="random"))
    report = measure_training_step(model, {"x": torch.randn(N, D_IN)}, loss_fn=square_loss)
    f = 4
    # saved: x A^T of each layer (n r), ReLU output (n d_hid), the output for the square (n d_out); x needs no grad
    assert report.saved_bytes == (2 * N * R + N * D_HID + N * D_OUT) * f
    base = D_HID * D_IN + D_HID + D_OUT * D_HID + D_OUT
    trainable = (R * R + D_HID * R) + (R * R + D_OUT * R)  # S and B of both layers
    assert report.parameter_bytes == (base + trainable) * f
    assert report.buffer_bytes == (R * D_IN + R * D_HID + D_HID * R + D_OUT * R) * f  # A and B0S0
    assert report.gradient_bytes == trainable * f
    assert report.optimizer_state_bytes == 2 * trainable * f + 4 * f  # exp_avg, exp_avg_sq, 4 step counters
    assert report.trainable_parameters == trainable
    assert report.accounted_bytes == sum((report.saved_bytes, report.parameter_bytes, report.buffer_bytes,
                                          report.gradient_bytes, report.optimizer_state_bytes))


def test_lora_shared_storage_is_counted_once_and_frozen_b_saves_nothing_more():
    model = two_layer(LoraConfig(r=R, target_modules=["fc1", "fc2"]))
    report = measure_training_step(model, {"x": torch.randn(N, D_IN)}, loss_fn=square_loss)
    # x for A1's grad, x A1^T, ReLU output (saved by ReLU and by A2: one storage), x A2^T, the output
    assert report.saved_bytes == (N * D_IN + N * R + N * D_HID + N * R + N * D_OUT) * 4

    lamda = two_layer(LamdaConfig(r=R, target_modules=["fc1", "fc2"], init="random"))
    for layer_b in (m.lamda_B["default"] for m in lamda.modules() if hasattr(m, "lamda_B")):
        layer_b.requires_grad_(False)
    frozen = measure_training_step(lamda, {"x": torch.randn(N, D_IN)}, loss_fn=square_loss)
    assert frozen.saved_bytes == (2 * N * R + N * D_HID + N * D_OUT) * 4
    assert frozen.trainable_parameters == 2 * R * R


def test_parameter_formulas_and_schedule():
    assert adapter_trainable_parameters("lora", 10, 20, 4) == 4 * 30
    assert adapter_trainable_parameters("lorafa", 10, 20, 4) == 4 * 20
    assert adapter_trainable_parameters("lamda", 10, 20, 4) == 16 + 80
    assert adapter_trainable_parameters("lamda_frozen", 10, 20, 4) == 16
    with pytest.raises(ValueError, match="unknown method"):
        adapter_trainable_parameters("dora", 10, 20, 4)
    # k(t) = min(r, floor(r t / (rho T))): r=4, rho=0.5, T=8 -> 0,1,2,3,4,4,4,4 frozen columns
    assert lamda_average_updates(d_out=10, r=4, freeze_ratio=0.5, total_steps=8) == 16 + 10 * (4 + 3 + 2 + 1) / 8
    assert lamda_average_updates(d_out=10, r=4, freeze_ratio=0.0, total_steps=8) == 16


def _floor_loss(model, batch):
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    return model(inputs_embeds=embeds, labels=batch["labels"]).loss


def _check_estimate(base, peft_config, batch, method, dtype, freeze_b=False):
    tokens = batch["input_ids"].shape
    estimate = estimate_training_step(base, tokens[0], tokens[1], method=method, r=peft_config.r if peft_config else 8,
                                      dtype=dtype)
    if peft_config is None:
        model, loss_fn = base.requires_grad_(False), _floor_loss
    else:
        model, loss_fn = get_peft_model(base, peft_config), lambda m, b: m(**b).loss
        for p in (m.lamda_B["default"] for m in model.modules() if freeze_b and hasattr(m, "lamda_B")):
            p.requires_grad_(False)
    measured = measure_training_step(model, batch, loss_fn=loss_fn)
    for field in ("saved_bytes", "gradient_bytes", "optimizer_state_bytes", "accounted_bytes"):
        got, want = getattr(estimate, field), getattr(measured, field)
        assert abs(got - want) <= 0.10 * want, f"{method} {field}: estimate {got} vs measured {want}"
    assert estimate.trainable_parameters == measured.trainable_parameters


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype", [("floor", torch.float32), ("lora", torch.float32),
                                          ("lamda", torch.float32), ("lora", torch.bfloat16),
                                          ("lamda_frozen", torch.bfloat16)])
def test_estimate_within_10_percent_on_smollm2(smollm2_path, method, dtype):
    from transformers import AutoModelForCausalLM

    # the first 4 of 30 layers: real shapes and weights, 7x less compute (the formulas scale with num_hidden_layers)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dtype, num_hidden_layers=4).train()
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    config = {"floor": None, "lora": LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")}.get(
        method, LamdaConfig(r=4, target_modules="all-linear", init="random", task_type="CAUSAL_LM"))
    _check_estimate(base, config, {"input_ids": ids, "labels": ids}, method, dtype, freeze_b=method == "lamda_frozen")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["floor", "lora", "lamda", "lamda_frozen"])
def test_estimate_within_10_percent_on_minilm(minilm_path, method):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).train()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    config = {"floor": None, "lora": LoraConfig(r=8, target_modules="all-linear", task_type="SEQ_CLS")}.get(
        method, LamdaConfig(r=8, target_modules="all-linear", init="random", task_type="SEQ_CLS"))
    _check_estimate(base, config, {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])}, method, torch.float32,
                    freeze_b=method == "lamda_frozen")


def test_estimate_rejects_targets_that_match_nothing(tiny_llama):
    with pytest.raises(ValueError, match="matches no module"):
        estimate_training_step(tiny_llama(), 1, 8, method="lamda", r=2, targets=["no_such_module"])
