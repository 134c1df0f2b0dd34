"""lamda_param_groups: one group per role, built from the registered containers, with its own learning rate, usable
with a plain loop (and the freezing schedule) and with the transformers Trainer."""

from __future__ import annotations

import argparse

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig, LoraFALayer, attach_freezing
from lamda_peft.optim import (LAMDA_LR_B_MULTIPLIER, LAMDA_LR_S_MULTIPLIER, add_lr_arguments, default_lr_S,
                               lamda_param_groups, trainer_optimizers)

TARGETS = ["query", "value", "dense"]


def tiny_classifier(config, seed: int = 0, hidden: int = 16):
    """A 2-layer BERT (hidden 16 unless given) with a 2-class head, wrapped with ``config`` (SEQ_CLS: the head is
    trained)."""
    torch.manual_seed(seed)
    bert = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2)
    return get_peft_model(BertForSequenceClassification(bert), config)


def lamda(**kw):
    return LamdaConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=TaskType.SEQ_CLS, **kw)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (n, 7), generator=g), "labels": torch.randint(0, 2, (n,), generator=g)}


def container_ids(model, cls, name):
    return {id(p) for m in model.modules() if isinstance(m, cls) for p in getattr(m, name).values()}


def head_ids(model):
    return {id(p) for p in model.base_model.model.classifier.modules_to_save.parameters()}


def groups_by_role(groups):
    return {g["role"]: g for g in groups}


def test_lamda_groups_are_the_registered_containers():
    model = tiny_classifier(lamda())
    groups = groups_by_role(lamda_param_groups(model, lr=1e-3, lr_S=5e-3, lr_B=2e-4, lr_head=3e-3))
    assert list(groups) == ["lamda_S", "lamda_B", "head"]
    assert {id(p) for p in groups["lamda_S"]["params"]} == container_ids(model, LamdaLayer, "lamda_S")
    assert {id(p) for p in groups["lamda_B"]["params"]} == container_ids(model, LamdaLayer, "lamda_B")
    assert {id(p) for p in groups["head"]["params"]} == head_ids(model)
    assert len(groups["lamda_S"]["params"]) == 11  # 2 layers x (query, value, 3 dense) + the pooler
    assert [groups[k]["lr"] for k in ("lamda_S", "lamda_B", "head")] == [5e-3, 2e-4, 3e-3]
    assert all(g["weight_decay"] == 0.0 for g in groups.values())
    # every trainable parameter is in exactly one group
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}


def test_weight_decay_spares_biases_and_norms_as_the_trainer_does():
    """With weight decay, each role's biases and normalization weights get their own group at weight_decay 0: the
    same split as the transformers Trainer's own AdamW (``Trainer.get_decay_parameter_names``)."""
    model = tiny_classifier(lamda())
    groups = lamda_param_groups(model, lr=1e-3, lr_head=3e-3, weight_decay=0.1)
    assert [(g["role"], g["weight_decay"]) for g in groups] == [
        ("lamda_S", 0.1), ("lamda_B", 0.1), ("head", 0.1), ("head", 0.0)]
    assert groups[2]["lr"] == groups[3]["lr"] == 3e-3
    names = {id(p): n for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="/tmp/unused", report_to=[], use_cpu=True))
    decayed_by_trainer = set(trainer.get_decay_parameter_names(model))
    for group in groups:
        for param in group["params"]:
            assert (names[id(param)] in decayed_by_trainer) == (group["weight_decay"] > 0), names[id(param)]
    assert {names[id(p)] for p in groups[3]["params"]} == {"base_model.model.classifier.modules_to_save.default.bias"}


def test_defaults_follow_lr():
    model = tiny_classifier(lamda())
    groups = groups_by_role(lamda_param_groups(model, lr=2e-3))
    assert groups["lamda_S"]["lr"] == pytest.approx(2e-3 * LAMDA_LR_S_MULTIPLIER)
    assert groups["lamda_B"]["lr"] == pytest.approx(2e-3 * LAMDA_LR_B_MULTIPLIER)
    assert groups["head"]["lr"] == 2e-3


def test_default_rate_of_S_falls_above_rank_16():
    """S's default rate is 5x lr up to r = 16 and 5x * 16 / r above (at r = 32 the 10x rate kept SST-2 at chance):
    modules of different ranks (rank_pattern, as LaMDA++ makes) get one group per rate, each S in the right one."""
    model = tiny_classifier(LamdaConfig(r=24, lora_alpha=48, target_modules=TARGETS, task_type=TaskType.SEQ_CLS,
                                        rank_pattern={"query": 4, "value": 32}), hidden=48)
    groups = lamda_param_groups(model, lr=1e-3)
    s_groups = [g for g in groups if g["role"] == "lamda_S"]
    rank_of = {id(m.lamda_S["default"]): m.r["default"] for m in model.modules() if isinstance(m, LamdaLayer)}
    assert sorted(set(rank_of.values())) == [4, 24, 32]
    expected = {4: 5e-3, 24: 1e-3 * 5 * 16 / 24, 32: 2.5e-3}  # written out, not from the library's formula
    assert [g["lr"] for g in s_groups] == pytest.approx(sorted(expected.values(), reverse=True))
    for group in s_groups:
        assert {rank_of[id(p)] for p in group["params"]} == {r for r, v in expected.items()
                                                              if v == pytest.approx(group["lr"])}
    assert sum(len(g["params"]) for g in s_groups) == len(rank_of) == 11
    # a given lr_S is one rate for every rank; lr_B is not touched by the rank
    assert [g["lr"] for g in lamda_param_groups(model, lr=1e-3, lr_S=2e-3) if g["role"] == "lamda_S"] == [2e-3]
    assert [g["lr"] for g in groups if g["role"] == "lamda_B"] == [1e-3 * LAMDA_LR_B_MULTIPLIER]


@pytest.mark.parametrize("rank, multiplier", [(1, 5), (8, 5), (16, 5), (24, 5 * 16 / 24), (32, 2.5), (64, 0.625),
                                              (128, 0.15625)])
def test_default_rate_of_S_by_rank(rank, multiplier):
    """5x up to r = 16, falling as 1/r to r = 32, then as 1/r^2 (at r = 64 the 1/r rate did not learn on one seed)."""
    assert default_lr_S(1e-3, rank) == pytest.approx(1e-3 * multiplier)


def test_lora_fa_and_plain_lora():
    fa = tiny_classifier(LoraFAConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=TaskType.SEQ_CLS))
    assert groups_by_role(lamda_param_groups(fa, lr=1e-3))["lorafa_B"]["lr"] == 1e-3  # LaMDA's multiplier: not here
    groups = groups_by_role(lamda_param_groups(fa, lr=1e-3, lr_B=4e-3))
    assert list(groups) == ["lorafa_B", "head"] and groups["lorafa_B"]["lr"] == 4e-3
    assert {id(p) for p in groups["lorafa_B"]["params"]} == container_ids(fa, LoraFALayer, "lorafa_B")
    lora = tiny_classifier(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=TaskType.SEQ_CLS))
    groups = groups_by_role(lamda_param_groups(lora, lr=1e-3, lr_head=1e-2))
    assert list(groups) == ["head", "adapter"] and groups["head"]["lr"] == 1e-2
    lora_params = {id(p) for n, p in lora.named_parameters() if p.requires_grad} - head_ids(lora)
    assert {id(p) for p in groups["adapter"]["params"]} == lora_params and len(lora_params) == 2 * 11


def test_unknown_trainable_parameter_is_an_error():
    model = tiny_classifier(lamda())
    model.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="word_embeddings.weight.*modules_to_save"):
        lamda_param_groups(model, lr=1e-3)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=1e-3, lr_S=-1.0), dict(lr=1e-3, lr_head=float("nan")),
                                 dict(lr=1e-3, weight_decay=-0.1), dict(lr=True)])
def test_bad_values_are_errors(bad):
    with pytest.raises(ValueError, match="must be"):
        lamda_param_groups(tiny_classifier(lamda()), **bad)


def one_adam_step_sizes(model, optimizer, data):
    """max |change| of S, B and the head over one optimizer step (Adam's first step moves each entry by ~lr)."""
    parts = {"S": [p for m in model.modules() if isinstance(m, LamdaLayer) for p in m.lamda_S.values()],
             "B": [p for m in model.modules() if isinstance(m, LamdaLayer) for p in m.lamda_B.values()],
             "head": list(model.base_model.model.classifier.modules_to_save.parameters())}
    before = {k: [p.detach().clone() for p in v] for k, v in parts.items()}
    optimizer.zero_grad()
    model(**data).loss.backward()
    optimizer.step()
    return {k: max(float((p.detach() - b).abs().max()) for p, b in zip(parts[k], before[k])) for k in parts}


def test_each_group_steps_with_its_own_lr_and_freezing_releases_b():
    model = tiny_classifier(lamda(freeze_ratio=0.5))
    groups = lamda_param_groups(model, lr=1e-3, lr_S=1e-2, lr_B=1e-4, lr_head=3e-3)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    freezer = attach_freezing(model, optimizer, total_steps=4)
    sizes = one_adam_step_sizes(model, optimizer, batch())
    # Adam's first step is lr * g / (|g| + eps): exactly lr for every entry whose gradient is >> eps
    assert sizes["S"] == pytest.approx(1e-2, rel=1e-3)
    assert sizes["B"] == pytest.approx(1e-4, rel=1e-3)
    assert sizes["head"] == pytest.approx(3e-3, rel=1e-3)
    for step in range(3):
        one_adam_step_sizes(model, optimizer, batch(seed=2 + step))
    assert freezer.released
    B_group = groups_by_role(optimizer.param_groups)["lamda_B"]
    assert all(not p.requires_grad and p not in optimizer.state for p in B_group["params"])  # idle, state dropped
    B_before = [p.detach().clone() for p in B_group["params"]]
    sizes = one_adam_step_sizes(model, optimizer, batch(seed=9))  # the idle group is no error; S still trains
    assert sizes["B"] == 0.0 and sizes["S"] > 0
    assert all(torch.equal(p, b) for p, b in zip(B_group["params"], B_before))


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_uses_the_groups(tmp_path, how):
    model = tiny_classifier(lamda())
    groups = lamda_param_groups(model, lr=1e-3, lr_S=1e-2, lr_head=5e-3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=1e-3,
                             lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to=[],
                             save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
    kw = ({"optimizers": (torch.optim.AdamW(groups, weight_decay=0.0), None)} if how == "optimizers"
          else {"optimizer_cls_and_kwargs": (torch.optim.AdamW, {"params": groups, "weight_decay": 0.0})})
    S = [p for m in model.modules() if isinstance(m, LamdaLayer) for p in m.lamda_S.values()]
    head = list(model.base_model.model.classifier.modules_to_save.parameters())
    before_S, before_head = [p.detach().clone() for p in S], [p.detach().clone() for p in head]
    data = batch(16)
    rows = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(16)]
    trainer = Trainer(model=model, args=args, train_dataset=rows, **kw)
    trainer.train()
    assert {g["role"]: g["lr"] for g in trainer.optimizer.param_groups} == {"lamda_S": 1e-2, "lamda_B": 1e-3 * LAMDA_LR_B_MULTIPLIER, "head": 5e-3}
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(S, before_S)) == pytest.approx(1e-2, rel=1e-3)
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(head, before_head)) == pytest.approx(5e-3, rel=1e-3)


def test_cli_options():
    parser = argparse.ArgumentParser()
    add_lr_arguments(parser)
    model = tiny_classifier(lamda())
    args = parser.parse_args(["--lr-S", "2e-2", "--lr-head", "4e-3"])
    args.method, args.lr = "lamda", 1e-3
    optimizer, scheduler = trainer_optimizers(model, args)
    assert scheduler is None
    assert {g["role"]: g["lr"] for g in optimizer.param_groups} == {"lamda_S": 2e-2, "lamda_B": 1e-3 * LAMDA_LR_B_MULTIPLIER, "head": 4e-3}
    args.method = "lora"
    with pytest.raises(ValueError, match="--lr-S, --lr-head apply to --method lamda"):
        trainer_optimizers(model, args)
    args = parser.parse_args([])
    args.method, args.lr = "full", 5e-5
    assert trainer_optimizers(model, args) == (None, None)
