"""The stall check: loss_ratio against hand-computed windows, the freezing window's end against the schedule, and
LamdaCallback's warning on a run that cannot learn (lr 0) but not on one that learns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from lamda_peft import LamdaCallback, LamdaConfig, attach_freezing, freeze_count, loss_ratio
from lamda_peft.stall import check_min_decrease

from conftest import make_tiny_llama

T, R, RATIO = 12, 4, 0.5  # the freezing window is steps (0, 6]: start (0, 2], end (4, 6]


def test_loss_ratio_is_end_third_over_start_third():
    losses = [(1, 2.0), (2, 4.0), (3, 9.0), (4, 9.0), (5, 1.0), (6, 2.0), (7, 50.0)]
    assert loss_ratio(losses, 6) == pytest.approx(((1.0 + 2.0) / 2) / ((2.0 + 4.0) / 2))
    # order does not matter; non-finite losses are skipped
    assert loss_ratio(list(reversed(losses)) + [(2, math.nan), (6, math.inf)], 6) == loss_ratio(losses, 6)
    # a third with no logged loss (logging_steps 4 over a 6-step window), a window too short, a zero start: no ratio
    assert loss_ratio([(4, 1.0), (8, 1.0)], 6) is None
    assert loss_ratio([(1, 1.0), (2, 1.0)], 2) is None
    assert loss_ratio([(1, 0.0), (6, 1.0)], 6) is None


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_min_decrease_must_be_a_fraction(value):
    with pytest.raises(ValueError, match="stall_min_decrease"):
        check_min_decrease(value)
    with pytest.raises(ValueError, match="stall_min_decrease"):
        LamdaCallback(stall_min_decrease=value)


@pytest.mark.parametrize("ratio, total", [(0.3, 10), (0.5, 12), (0.3, 400), (1.0, 7), (0.0, 5)])
def test_freeze_end_step_is_the_first_step_with_every_column_frozen(ratio, total):
    model = get_peft_model(make_tiny_llama(), LamdaConfig(r=R, target_modules=["q_proj"], freeze_ratio=ratio))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    freezer = attach_freezing(model, optimizer, total)
    first_full = next(t for t in range(total + 1) if freeze_count(t, total, R, ratio) == R)
    assert freezer.freeze_end_step == first_full
    freezer.detach()


def train(tmp_path, lr, **callback_options):
    torch.manual_seed(0)
    config = LamdaConfig(r=R, lora_alpha=8, target_modules=["q_proj", "down_proj", "lm_head"], freeze_ratio=RATIO)
    model = get_peft_model(make_tiny_llama(), config)
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": ids, "labels": ids}] * 16  # one sequence: at lr 0 the loss is exactly constant
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=T, per_device_train_batch_size=4, learning_rate=lr,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                             report_to=[], disable_tqdm=True)
    callback = LamdaCallback(**callback_options)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    stalls = [w for w in caught if "has not left its start" in str(w.message)]
    return trainer.state.log_history, callback, stalls


def logged_ratio(history):
    """The ratio from the log by hand: losses at steps 1-2 (start) and 5-6 (end)."""
    loss = {e["step"]: e["loss"] for e in history if "loss" in e}
    return ((loss[5] + loss[6]) / 2) / ((loss[1] + loss[2]) / 2)


def test_callback_warns_once_when_the_loss_has_not_moved(tmp_path):
    history, callback, stalls = train(tmp_path, lr=0.0)
    ratios = [(e["step"], e["lamda_loss_ratio"]) for e in history if "lamda_loss_ratio" in e]
    assert ratios == [(6, pytest.approx(1.0))]  # logged once, at the end of the freezing window
    assert len(stalls) == 1 and "step 6" in str(stalls[0].message)
    assert callback.state()["attributes"]["stall_checked"] is True


def test_callback_logs_the_ratio_and_stays_quiet_when_the_loss_falls(tmp_path):
    history, _, stalls = train(tmp_path, lr=0.1)
    ratio = next(e["lamda_loss_ratio"] for e in history if "lamda_loss_ratio" in e)
    assert ratio == pytest.approx(logged_ratio(history), abs=1e-4)
    assert ratio < 0.9 and not stalls


def test_callback_check_can_be_turned_off(tmp_path):
    history, _, stalls = train(tmp_path, lr=0.0, stall_min_decrease=None)
    assert not stalls
    assert any("lamda_loss_ratio" in e for e in history)  # the figure is still logged
