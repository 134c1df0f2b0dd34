"""Weight decay pulls LaMDA's S toward I and B toward B0S0, i.e. toward the pretrained model (anchored_decay.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model

from lamda_peft import (LamdaCallback, LamdaConfig, LamdaLayer, LoraFAConfig, attach_freezing, initialize,
                        lamda_param_groups)
from lamda_peft.anchored_decay import anchor_weight_decay

from conftest import make_tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _lamda(init: str = "spectral", r: int = 4):
    config = LamdaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init=init)
    model = get_peft_model(make_tiny_llama(), config)
    if init in ("activations", "gradient"):  # data-driven: B0S0 and A come from a calibration
        initialize(model, [{"input_ids": IDS, "labels": IDS}], num_batches=1, show_progress_bar=False)
    return model


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _zero_gradient_steps(model, optimizer, steps: int) -> None:
    """Steps whose loss has a zero gradient (but every gradient exists, so the optimizer decays every parameter)."""
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (0.0 * model(input_ids=IDS).logits.sum()).backward()
        optimizer.step()


@pytest.mark.parametrize("init", ["spectral", "spectral_zero", "random", "activations", "gradient"])
def test_zero_gradient_run_with_weight_decay_leaves_the_model_unchanged(init):
    model = _lamda(init)
    before = _logits(model)
    optimizer = torch.optim.AdamW(lamda_param_groups(model, lr=1e-3, weight_decay=0.1))
    attach_freezing(model, optimizer, total_steps=300)
    _zero_gradient_steps(model, optimizer, 300)
    after = _logits(model)
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_without_the_anchor_the_same_run_moves_the_model():
    """The defect the anchor fixes (and the check above could see): plain AdamW decay drives S, B to 0."""
    model = _lamda()
    before = _logits(model)
    optimizer = torch.optim.AdamW(lamda_param_groups(model, lr=1e-3, weight_decay=0.1))
    _zero_gradient_steps(model, optimizer, 300)  # no attach_freezing: no anchor
    assert float((_logits(model) - before).norm() / before.norm()) > 1e-3


def _random_grads(params, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("optimizer_name", ["AdamW", "SGD", "Adam"])
def test_anchored_decay_matches_a_float64_reference(optimizer_name):
    """With real (random) gradients: AdamW decays p - lr wd (p - anchor) before its update; SGD and Adam (coupled L2)
    see the gradient g + wd (p - anchor). Checked against the formulas in float64, and the caller's .grad is kept."""
    model = _lamda()
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    S, B, B0S0 = layer.lamda_S["default"], layer.lamda_B["default"], layer.lamda_B0S0["default"]
    with torch.no_grad():  # start away from the anchor so that the decay term matters
        S.add_(0.3 * torch.randn(S.shape, generator=torch.Generator().manual_seed(1)))
        B.mul_(1.5)
    params, anchors = [S, B], [torch.eye(S.shape[0], dtype=torch.float64), B0S0.double()]
    lr, wd, (beta1, beta2), eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    cls = getattr(torch.optim, optimizer_name)
    optimizer = cls(params, lr=lr, weight_decay=wd, **({} if optimizer_name == "SGD" else {"eps": eps}))
    anchor_weight_decay(model, optimizer)
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for step in range(1, 6):
        grads = _random_grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # the gradient the caller sees is unchanged
        for i, (g, a) in enumerate(zip(grads, anchors)):
            g = g.double()
            if optimizer_name == "SGD":
                ref[i] -= lr * (g + wd * (ref[i] - a))
                continue
            if optimizer_name == "AdamW":
                ref[i] -= lr * wd * (ref[i] - a)
            else:
                g = g + wd * (ref[i] - a)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            ref[i] -= lr * (m[i] / (1 - beta1 ** step)) / ((v[i] / (1 - beta2 ** step)).sqrt() + eps)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


def test_frozen_columns_stay_bit_identical_under_anchored_decay():
    model = _lamda()
    optimizer = torch.optim.AdamW(lamda_param_groups(model, lr=1e-2, weight_decay=0.1))
    freezer = attach_freezing(model, optimizer, total_steps=10, release="never")
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    B = layer.lamda_B["default"]
    model.train()
    for step in range(6):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        if step == 1:
            k = freezer.targets[0].k
            assert 0 < k < 4
            frozen = B.detach()[:, :k].clone()
    torch.testing.assert_close(B.detach()[:, :k], frozen, rtol=0, atol=0)


def test_the_trainer_own_adamw_is_anchored_through_the_callback(tmp_path):
    """The Trainer builds its own AdamW (weight_decay=0.1 on every non-bias, non-norm parameter); LamdaCallback
    anchors it: a zero-gradient run leaves the logits where they were."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = _lamda()
    before = _logits(model)
    data = Dataset.from_dict({"input_ids": IDS.repeat(4, 1).tolist(), "labels": IDS.repeat(4, 1).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=2, learning_rate=1e-2,
                             weight_decay=0.1, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LamdaCallback(stall_min_decrease=None)],
                      compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0.0 * outputs.logits.sum())
    trainer.train()
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert 0.1 in decays  # the Trainer did decay the LaMDA factors
    assert float((_logits(model) - before).norm() / before.norm()) < 1e-5


def test_lora_fa_keeps_plain_decay_and_unknown_optimizers_warn():
    lora_fa = get_peft_model(make_tiny_llama(), LoraFAConfig(r=4, target_modules="all-linear"))
    assert anchor_weight_decay(lora_fa, torch.optim.AdamW(lamda_param_groups(lora_fa, lr=1e-3, weight_decay=0.1))) is None
    model = _lamda()
    optimizer = torch.optim.Adafactor(lamda_param_groups(model, lr=1e-3, weight_decay=0.1))
    with pytest.warns(UserWarning, match="cannot be re-anchored here: the optimizer Adafactor"):
        assert anchor_weight_decay(model, optimizer) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decay, nothing to say
        assert anchor_weight_decay(model, torch.optim.AdamW(lamda_param_groups(model, lr=1e-3))) is None
