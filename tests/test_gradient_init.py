"""LamdaConfig(init="gradient") through lamda_peft.initialize: A and B0 span the top-r singular subspaces of the loss
gradient with respect to the base weight; step 0 exact; trains, reloads, exports and merges exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from lamda_peft import LamdaConfig, LamdaLayer, attach_freezing, export_lora, initialize, lamda_param_groups

from conftest import make_tiny_llama, run_two_ranks
from test_activations import ALPHA, R, _batches, _layers, _model, train_steps
from test_gradient_sketch import _float64_gradients as float64_gradients
from test_gradient_sketch import _largest_angle_degrees as largest_angle_degrees


def _float64_gradients(batches) -> dict[str, torch.Tensor]:
    names = [n.removeprefix("base_model.model.") for n in _layers(_model(init="gradient"))]
    return float64_gradients(make_tiny_llama, batches, names)


def test_factors_span_the_gradient_subspaces_and_step_0_is_exact():
    batches = _batches(3)
    model = _model(init="gradient")
    probe = batches[0]
    with torch.no_grad():
        base = make_tiny_llama()(input_ids=probe["input_ids"]).logits
    initialize(model, batches, num_batches=3, oversample=64, show_progress_bar=False)  # a full-width sketch: exact
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=probe["input_ids"]).logits, base)
    gradients = _float64_gradients(batches)
    for name, layer in _layers(model).items():
        U, S, Vh = torch.linalg.svd(gradients[name.removeprefix("base_model.model.")])
        A, B0S0 = layer.lamda_A["default"], layer.lamda_B0S0["default"]
        assert largest_angle_degrees(A.T, Vh[:R].T) < 0.05, name
        assert largest_angle_degrees(B0S0, U[:, :R]) < 0.05, name
        # A's rows and B0's columns are orthogonal with one common length (module docstring)
        gram = A.double() @ A.double().T
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(R, dtype=torch.float64), rtol=1e-4, atol=1e-6)
        assert torch.equal(layer.lamda_B["default"], B0S0)


def test_trains_with_freezing_reloads_exports_and_merges_exactly(tmp_path):
    model = _model(init="gradient")
    initialize(model, _batches(2), num_batches=2, show_progress_bar=False)
    optimizer = torch.optim.AdamW(lamda_param_groups(model, 1e-2, weight_decay=0.01))
    freezer = attach_freezing(model, optimizer, total_steps=4)
    train_steps(model, optimizer, _batches(4, seed=9))
    freezer.detach()
    probe = _batches(1, seed=11)[0]["input_ids"]
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits
        assert not torch.equal(trained, make_tiny_llama()(input_ids=probe).logits)
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a").eval()
    assert not any(m.awaiting_calibration for m in _layers(reloaded).values())  # never recalibrates
    with pytest.raises(ValueError, match="already initialized"):
        initialize(reloaded, _batches(2), num_batches=2)
    export_lora(reloaded, tmp_path / "lora")
    lora = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, trained)
        torch.testing.assert_close(lora(input_ids=probe).logits, trained, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=probe).logits, trained, rtol=1e-5, atol=1e-5)


def test_training_before_the_init_and_bad_calls_are_refused():
    model = _model(init="gradient")
    batch = _batches(1)[0]
    model.train()
    with pytest.raises(RuntimeError, match=r"lamda_peft.initialize\(model, dataloader\)"):
        model(**batch).loss.backward()
    with pytest.raises(ValueError, match="returned no loss"):  # the gradient init needs labels
        initialize(model, [{"input_ids": batch["input_ids"]}], num_batches=1)
    with pytest.raises(ValueError, match="no batch"):
        initialize(model, [], num_batches=1)
    with pytest.raises(ValueError, match="modules_to_save"):  # no head to warm up on a causal LM
        initialize(model, [batch], num_batches=1, head_warmup_steps=2)
    with pytest.raises(ValueError, match="init_weights=False cannot be combined with init='gradient'"):
        LamdaConfig(init="gradient", init_weights=False)
    with pytest.raises(ValueError, match="not created with"):
        initialize(_model(init="spectral"), [batch], num_batches=1)


def _classifier(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=2,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def test_head_warm_up_trains_the_head_alone_and_changes_the_subspace():
    """A new classification head starts random, so the gradient it sends into the body is arbitrary; warming the
    head up first changes the subspace, and only the head (and then the factors) moved."""
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(1, 128, (8, 10), generator=g), "labels": torch.randint(0, 2, (8,),
                                                                                                  generator=g)}
               for _ in range(3)]
    config = dict(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], init="gradient",
                  task_type="SEQ_CLS")
    cold = get_peft_model(_classifier(), LamdaConfig(**config))
    warm = get_peft_model(_classifier(), LamdaConfig(**config))
    head_before = {n: p.detach().clone() for n, p in warm.named_parameters() if "score" in n and p.requires_grad}
    body_before = {n: p.detach().clone() for n, p in warm.named_parameters() if "lamda_" not in n and "score" not in n}
    initialize(cold, batches, num_batches=3, show_progress_bar=False)
    initialize(warm, batches, num_batches=3, head_warmup_steps=10, head_lr=1e-2, show_progress_bar=False)
    assert head_before and all(not torch.equal(p, head_before[n]) for n, p in warm.named_parameters() if n in head_before)
    assert all(torch.equal(p, body_before[n]) for n, p in warm.named_parameters() if n in body_before)
    assert all(p.requires_grad for n, p in warm.named_parameters() if "lamda_S" in n or "lamda_B" in n)
    angles = [largest_angle_degrees(a.lamda_A["default"].T, b.lamda_A["default"].T)
              for a, b in zip(_layers(cold).values(), _layers(warm).values())]
    assert max(angles) > 1.0


@pytest.mark.distributed
def test_data_parallel_ranks_get_the_same_factors_as_one_process_on_all_batches():
    result = run_two_ranks(Path(__file__).resolve().parent / "activations_dist_worker.py", "gradient", port=29662,
                           timeout=240)
    assert result["layers"] == 14 and result["ranks_equal"]
    assert result["max_diff_to_single_process"] < 1e-4


def test_gradient_checkpointing_and_train_mode_give_the_same_factors():
    """A model prepared for training (gradient checkpointing on, train mode) calibrates as one without: the
    calibration runs in eval mode (no dropout, so the same gradient on every pass) and gives back the modes."""
    plain, prepared = _model(init="gradient"), _model(init="gradient")
    prepared.base_model.model.gradient_checkpointing_enable()
    prepared.train()
    initialize(plain, _batches(2), num_batches=2, show_progress_bar=False)
    initialize(prepared, _batches(2), num_batches=2, show_progress_bar=False)
    assert prepared.training and prepared.base_model.model.is_gradient_checkpointing
    for a, b in zip(_layers(plain).values(), _layers(prepared).values()):
        assert torch.equal(a.lamda_A["default"], b.lamda_A["default"])
        assert torch.equal(a.lamda_B0S0["default"], b.lamda_B0S0["default"])
