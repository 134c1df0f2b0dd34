"""The LaMDA/LoRA-FA layer: step 0 is the pretrained model, and the delta form equals the residual form."""

import pytest
import torch
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig, LoraFALayer
from lamda_peft.spectral import spectral_factors, top_svd

from conftest import make_tiny_gpt2, make_tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INITS = ["spectral", "spectral_zero", "random"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_step_zero_is_bit_identical(make_model, init, dtype, input_ids):
    reference = make_model(dtype=dtype)(input_ids).logits
    model = get_peft_model(make_model(dtype=dtype), LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", init=init))
    assert torch.equal(model(input_ids).logits, reference)
    # the base weights are never modified
    base = make_model(dtype=dtype).state_dict()
    for name, value in model.base_model.model.state_dict().items():
        if "base_layer" in name:
            assert torch.equal(value, base[name.replace("base_layer.", "")])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_fa_step_zero_is_bit_identical(dtype, input_ids):
    reference = make_tiny_llama(dtype=dtype)(input_ids).logits
    model = get_peft_model(make_tiny_llama(dtype=dtype), LoraFAConfig(r=4, target_modules="all-linear"))
    assert torch.equal(model(input_ids).logits, reference)


def _single_layer(layer_cls, config, base):
    return layer_cls(base, "default", config, r=config.r, lora_alpha=config.lora_alpha, module_name="lin")


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_delta_form_matches_residual_form_in_float64(conv1d):
    """Outputs and gradients of S and B equal those of y = x W_res^T + s B S A x, W_res = W0 - s B0 S0 A."""
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 20, 12, 4, 8.0
    base = Conv1D(d_out, d_in) if conv1d else torch.nn.Linear(d_in, d_out)
    torch.nn.init.normal_(base.weight)
    config = LamdaConfig(r=r, lora_alpha=alpha, target_modules=["lin"])
    layer = _single_layer(LamdaLayer, config, base)
    with torch.no_grad():  # move away from init so that B S - B0 S0 is not zero
        layer.lamda_S["default"].add_(0.1 * torch.randn(r, r))
        layer.lamda_B["default"].add_(0.1 * torch.randn(d_out, r))
    x = torch.randn(3, 5, d_in)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # independent float64 reference of the residual form, from an SVD of W0 computed here
    W0 = (base.weight.T if conv1d else base.weight).detach().double()
    s = alpha / r
    U, S_vals, Vh = torch.linalg.svd(W0, full_matrices=False)
    root = torch.sqrt(S_vals[:r] / s)
    # singular vectors are defined up to sign: align the reference's with the layer's before comparing
    signs = torch.sign((layer.lamda_A["default"].double() * (root[:, None] * Vh[:r])).sum(dim=1))
    A = signs[:, None] * root[:, None] * Vh[:r]
    B0 = U[:, :r] * root[None, :] * signs[None, :]
    W_res = W0 - s * B0 @ A
    S = layer.lamda_S["default"].detach().double().requires_grad_()
    B = layer.lamda_B["default"].detach().double().requires_grad_()
    x64 = x.double()
    ref = x64 @ W_res.T + s * (x64 @ A.T) @ S.T @ B.T + base.bias.detach().double()
    ref.backward(grad_out.double())
    assert torch.allclose(layer.lamda_A["default"].double(), A, atol=1e-5)
    assert torch.allclose(out.double(), ref, atol=1e-4)
    # float32 layer against a float64 reference: the rounding scales with the largest gradient entry (~50 here)
    for got, want in ((layer.lamda_S["default"].grad, S.grad), (layer.lamda_B["default"].grad, B.grad)):
        assert torch.allclose(got.double(), want, atol=1e-5 * float(want.abs().max()))


def test_lora_fa_gradient_matches_formula():
    torch.manual_seed(1)
    base = torch.nn.Linear(10, 6)
    layer = _single_layer(LoraFALayer, LoraFAConfig(r=3, lora_alpha=6, target_modules=["lin"]), base)
    with torch.no_grad():
        layer.lorafa_B["default"].normal_()
    x = torch.randn(7, 10, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    A = layer.lorafa_A["default"].double()
    B = layer.lorafa_B["default"].detach().double()
    s = 2.0
    expected_out = x.double() @ base.weight.double().T + base.bias.double() + s * (x.double() @ A.T) @ B.T
    assert torch.allclose(out.double(), expected_out, atol=1e-5)
    expected_gB = s * grad_out.double().T @ (x.double() @ A.T)
    assert torch.allclose(layer.lorafa_B["default"].grad.double(), expected_gB, atol=1e-5)
    expected_gx = grad_out.double() @ (base.weight.double() + s * B @ A)
    assert torch.allclose(x.grad.double(), expected_gx, atol=1e-5)


def test_spectral_factors_are_stored_and_frozen_as_buffers():
    base = torch.nn.Linear(16, 8)
    layer = _single_layer(LamdaLayer, LamdaConfig(r=3, lora_alpha=6, target_modules=["lin"]), base)
    svd = top_svd(base.weight, 3)
    expected = spectral_factors(svd, 2.0)
    assert torch.allclose(layer.lamda_A["default"], expected.A) and torch.allclose(layer.lamda_B0S0["default"], expected.B0)
    assert torch.equal(layer.lamda_S["default"], torch.eye(3)) and torch.equal(layer.lamda_B["default"], layer.lamda_B0S0["default"])
    parameter_names = {name for name, _ in layer.named_parameters()}
    assert parameter_names == {"base_layer.weight", "base_layer.bias", "lamda_S.default", "lamda_B.default"}
    buffer_names = {name for name, _ in layer.named_buffers()}
    assert buffer_names == {"lamda_A.default", "lamda_B0S0.default"}


def test_bf16_base_keeps_fp32_trainable_factors_and_bf16_activations(input_ids):
    model = get_peft_model(make_tiny_llama(dtype=torch.bfloat16), LamdaConfig(r=4, target_modules="all-linear"))
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    assert layer.lamda_A["default"].dtype == torch.bfloat16  # A follows the base: no cast, no copy of x
    assert layer.lamda_S["default"].dtype == layer.lamda_B["default"].dtype == torch.float32
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert layer.lamda_S["default"].grad.dtype == torch.float32 and torch.isfinite(layer.lamda_S["default"].grad).all()
