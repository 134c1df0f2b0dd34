"""LamdaCallback with the transformers Trainer: schedule in the logs, exact frozen columns, bit-identical resume,
and a short real fine-tune of MiniLM on SST-2."""

from __future__ import annotations

import csv

import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from lamda_peft import LamdaCallback, LamdaConfig, LamdaLayer, freeze_count

from conftest import make_tiny_llama

T, R, RATIO, SAVE = 8, 4, 0.5, 3


def tiny_peft_model():
    config = LamdaConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], freeze_ratio=RATIO)
    return get_peft_model(make_tiny_llama(), config)


def token_rows(n=32):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (n, 9), generator=g)]


def train(output_dir, resume=None):
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=T, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=1, save_steps=SAVE, save_strategy="steps", use_cpu=True, seed=0,
        dataloader_num_workers=0, report_to=[], disable_tqdm=True,
    )
    model = tiny_peft_model()
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[LamdaCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def adapter_state(model):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_trainer_logs_schedule_and_keeps_frozen_columns_exact(tmp_path):
    model, trainer = train(tmp_path)
    n_layers = sum(isinstance(m, LamdaLayer) for m in model.modules())
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == list(range(1, T + 1))
    for step, entry in logged.items():
        k = freeze_count(step, T, R, RATIO)
        assert entry["lamda_frozen_columns"] == n_layers * k
        assert entry["lamda_frozen_fraction"] == k / R
    # columns frozen by step 3 hold at the end exactly the values saved in checkpoint-3
    saved = load_file(str(tmp_path / f"checkpoint-{SAVE}" / "adapter_model.safetensors"))
    final = adapter_state(model)
    k = freeze_count(SAVE, T, R, RATIO)
    b_keys = [key for key in final if key.endswith(".lamda_B")]
    assert b_keys and 0 < k < R
    for key in b_keys:
        assert torch.equal(final[key][:, :k], saved[key][:, :k])
        assert not torch.equal(final[key][:, k:], saved[key][:, k:])  # the others went on training
    B = next(m.lamda_B["default"] for m in model.modules() if isinstance(m, LamdaLayer))
    assert not B.requires_grad  # released once fully frozen (step 4)


def test_resume_is_bit_identical(tmp_path):
    """Stopping at step k and resuming from the Trainer checkpoint ends exactly where an uninterrupted run does,
    from a checkpoint where B is partly frozen (k=3: 3 of 4 columns) and from one where it is released (k=6)."""
    full, _ = train(tmp_path)
    expected = adapter_state(full)
    for resume_step in (SAVE, 2 * SAVE):
        resumed, trainer = train(tmp_path, resume=str(tmp_path / f"checkpoint-{resume_step}"))
        got = adapter_state(resumed)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (resume_step, key)
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LamdaCallback))
        assert callback.freezer.step == T and callback.skipped_steps == 0


def sst2_rows(glue_dir, tokenizer, n=48):
    with open(glue_dir / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    enc = tokenizer([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=24)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": int(rows[i]["label"])} for i in range(n)]


class RecordB(TrainerCallback):
    """Keeps every LaMDA B after every optimizer step (index 0: before training)."""

    def __init__(self, model):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
        self.history = [self.snapshot()]

    def snapshot(self):
        return {n: m.lamda_B["default"].detach().clone() for n, m in self.layers.items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append(self.snapshot())


@pytest.mark.slow
def test_minilm_sst2_fine_tune_with_callback(tmp_path, minilm_path, glue_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model = get_peft_model(base, LamdaConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             freeze_ratio=0.3, task_type="SEQ_CLS"))
    record = RecordB(model)
    steps = 12
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=5e-3, weight_decay=0.01, logging_steps=4, save_strategy="no", use_cpu=True,
                             seed=0, dataloader_num_workers=0, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=sst2_rows(glue_dir, tokenizer),
                      callbacks=[LamdaCallback(), record])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [e["lamda_frozen_fraction"] for e in logs] == [freeze_count(e["step"], steps, 8, 0.3) / 8 for e in logs]
    assert logs[-1]["lamda_frozen_fraction"] == 1.0
    for t in range(1, steps + 1):  # columns frozen before step t did not move in it; the others did
        k = freeze_count(t - 1, steps, 8, 0.3)
        for name, B in record.history[t].items():
            assert torch.equal(B[:, :k], record.history[t - 1][name][:, :k]), (name, t)
            assert k == 8 or not torch.equal(B[:, k:], record.history[t - 1][name][:, k:]), (name, t)
    assert not any(m.lamda_B["default"].requires_grad for m in record.layers.values())
