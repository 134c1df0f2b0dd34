"""The top-r singular subspaces of the loss gradient from sketches (tuners/lamda/gradient.py) against the float64
gradient itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lamda_peft.tuners.lamda.gradient import gradient_top_svd

from conftest import make_tiny_llama

R = 4


def _batches(n: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (4, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}


def _float64_gradients(make, batches, names) -> dict[str, torch.Tensor]:
    """G = dL/dW0 of each layer, summed over the batches, in float64 (the reference)."""
    model = make().double().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight.requires_grad_(True) for n in names}
    for batch in batches:
        model(**batch).loss.backward()
    return {n: w.grad for n, w in weights.items()}


def _largest_angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest principal angle between the column spans of a and b."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(float(torch.arccos(cosines.min())))


def test_a_full_width_sketch_is_the_exact_svd_of_the_gradient():
    """With as many sketch columns as the smaller side, the sketch spans G: the factors are G's own top r."""
    model, batches = make_tiny_llama(), _batches()
    layers = _linears(model)
    found = gradient_top_svd(model, layers, batches, dict.fromkeys(layers, R), oversample=200, power_iterations=0,
                             show_progress_bar=False)
    reference = _float64_gradients(make_tiny_llama, batches, layers)
    for name, G in reference.items():
        U, S, Vh = torch.linalg.svd(G)
        torch.testing.assert_close(found[name].S.double(), S[:R], rtol=2e-4, atol=1e-7)
        assert _largest_angle_degrees(found[name].Vh.T, Vh[:R].T) < 1e-2, name
        assert _largest_angle_degrees(found[name].U, U[:, :R]) < 1e-2, name


class _TwoLayer(nn.Module):
    """x -> relu(x W1^T) W2^T with inputs near a 4-dimensional subspace: G = sum delta^T x has a clear top 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(96, 80, bias=False), nn.Linear(80, 10, bias=False)

    def forward(self, x, labels):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels)}


def _structured_batches(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(R, 96, generator=g)
    scale = torch.linspace(1.0, 0.5, R)[:, None]
    return [{"x": torch.randn(32, R, generator=g) @ (scale * basis) + 0.02 * torch.randn(32, 96, generator=g),
             "labels": torch.randint(0, 10, (32,), generator=g)} for _ in range(n)]


def test_the_default_sketch_finds_a_separated_top_subspace():
    model, batches = _TwoLayer(), _structured_batches()
    layers = {"fc1": model.fc1}
    found = gradient_top_svd(model, layers, batches, {"fc1": R}, show_progress_bar=False)
    model64 = _TwoLayer().double()
    for param in model64.parameters():
        param.requires_grad_(False)
    model64.fc1.weight.requires_grad_(True)
    for batch in batches:
        model64(x=batch["x"].double(), labels=batch["labels"])["loss"].backward()
    U, S, Vh = torch.linalg.svd(model64.fc1.weight.grad)
    assert S[R] < 0.5 * S[R - 1]  # the gap the claim is about
    assert _largest_angle_degrees(found["fc1"].Vh.T, Vh[:R].T) < 0.5
    assert _largest_angle_degrees(found["fc1"].U, U[:, :R]) < 0.5


def test_the_model_is_left_as_it_was():
    model, batches = make_tiny_llama(), _batches(2)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    model.model.layers[0].mlp.train()
    before = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    probe = batches[0]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    gradient_top_svd(model, _linears(model), batches, dict.fromkeys(_linears(model), R), show_progress_bar=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for name, param in model.named_parameters():
        assert param.requires_grad == before[name][0] and param.grad is before[name][1], name
    assert not any(m._forward_hooks for m in model.modules())  # the sketches are gone
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, logits)


def test_same_call_same_factors_and_bad_input():
    model, batches = make_tiny_llama(), _batches(2)
    layers = _linears(model)
    one = gradient_top_svd(model, layers, batches, dict.fromkeys(layers, R), show_progress_bar=False)
    two = gradient_top_svd(model, layers, batches, dict.fromkeys(layers, R), show_progress_bar=False)
    for name in layers:
        assert torch.equal(one[name].Vh, two[name].Vh) and torch.equal(one[name].U, two[name].U)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        gradient_top_svd(model, layers, [], dict.fromkeys(layers, R))
    with pytest.raises(ValueError, match="returned no loss"):
        gradient_top_svd(model, layers, [{"input_ids": batches[0]["input_ids"]}], dict.fromkeys(layers, R))
