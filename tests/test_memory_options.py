"""lamda_peft.memory_options leave the loss and the gradients unchanged, and save what they claim."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lamda_peft import LamdaConfig
from lamda_peft.memory import measure_training_step
from lamda_peft.memory_options import chunked_causal_lm_loss, chunked_cross_entropy, enable_layer_checkpointing


def _lamda(make, seed=0):
    model = get_peft_model(make(seed), LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # move B and S off their init so that every gradient path is non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_cross_entropy_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(13, 6, generator=g), torch.randn(20, 6, generator=g)
    labels = torch.randint(0, 20, (13,), generator=g)
    labels[[2, 7]] = -100
    hidden.requires_grad_(True)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ weight.double().T, labels, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, h64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_options_leave_loss_and_gradients_unchanged(tiny_llama, input_ids, checkpointing):
    plain = _lamda(tiny_llama).train()
    plain(input_ids=input_ids, labels=input_ids).loss.backward()
    reference_loss = plain(input_ids=input_ids, labels=input_ids).loss.detach()

    model = _lamda(tiny_llama).train()
    if checkpointing:
        enable_layer_checkpointing(model)
    loss = chunked_causal_lm_loss(model, input_ids, input_ids, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference_loss, rtol=1e-5, atol=1e-6)
    got, want = _grads(model), _grads(plain)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_options_save_the_logits_and_the_layer_interiors(tiny_llama, input_ids):
    def saved(checkpointing, chunked):
        model = _lamda(tiny_llama).train()
        if checkpointing:
            enable_layer_checkpointing(model)
        batch = {"input_ids": input_ids, "labels": input_ids}
        loss_fn = (lambda m, b: chunked_causal_lm_loss(m, b["input_ids"], b["labels"], chunk_size=4)) if chunked \
            else (lambda m, b: m(**b).loss)
        return measure_training_step(model, batch, loss_fn=loss_fn).saved_bytes

    plain, chunked, both = saved(False, False), saved(False, True), saved(True, True)
    n, vocab, hidden = input_ids.numel(), 128, 32
    # the chunked loss drops the fp32 log-softmax of the logits (n V 4 bytes) for the final hidden states
    # (n h 4 bytes) and a few scalars
    assert chunked <= plain - n * vocab * 4 + n * hidden * 4 + 64
    assert both < chunked / 2
