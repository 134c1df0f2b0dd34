"""LaMDA and LoRA-FA on a bitsandbytes 4-bit (NF4) or 8-bit base (QLoRA-style); bitsandbytes runs on this CPU.

References are independent of lamda_peft: bitsandbytes' own dequantization, float64 SVDs, bnb's quantization of a
float weight, and the byte counts of the packed format.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from lamda_peft import LamdaConfig, LoraFAConfig, keep_training_layout
from lamda_peft.memory import measure_training_step
from lamda_peft.tuners.quantized import dense_weight, quantization_state_bytes

from conftest import make_tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="needs pip install 'lamda-peft[quant]'")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(seed=3).save_pretrained(path)
    return str(path)


def load(path: str, bits: int, compute_dtype: torch.dtype = torch.float32, keep_layout: bool = True):
    """The quantized model. ``keep_layout``: with bnb's CPU inference repack off (as adding an adapter does), so a
    reference forward taken before the adapter is added neither repacks the weights (on AVX512-BF16 CPUs) nor, at
    the tiny model's 32 inputs per layer, crashes inside bnb."""
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
         if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q)
    if keep_layout:
        keep_training_layout(model)
    return model


def lamda(**kw) -> LamdaConfig:
    return LamdaConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def lorafa(**kw) -> LoraFAConfig:
    return LoraFAConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def train_steps(model, ids, steps: int = 2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("make_config", [lamda, lorafa], ids=["lamda", "lorafa"])
def test_step_zero_equals_the_quantized_model_then_trains(tiny_dir, input_ids, bits, make_config):
    base = load(tiny_dir, bits)
    with torch.no_grad():
        reference = base(input_ids).logits
    model = get_peft_model(base, make_config())
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference)  # exactly: the delta is 0, the base untouched
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    packed = layer.get_base_layer().weight.clone()
    train_steps(model, input_ids)
    assert torch.equal(layer.get_base_layer().weight, packed)  # the quantized base is never rewritten
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, reference)


def test_the_cpu_inference_repack_is_undone_and_kept_off(tmp_path, input_ids):
    """bnb repacks a ``Linear4bit`` in place at an eval-mode forward without gradients on AVX512-BF16 CPUs, into a
    layout gradients do not pass through. Adding the adapter undoes a repack (with a warning: it rounded the scales)
    and switches it off for every 4-bit layer. The repack is forced with bnb's own function, so this runs on any
    CPU; the layers here have 64-128 inputs, which the repack needs."""
    functional = bnb.functional
    if not hasattr(functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repack")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    reference = get_peft_model(load(str(tmp_path), 4), lamda())  # never repacked
    raw = load(str(tmp_path), 4, keep_layout=False)
    layers = [m for m in raw.modules() if isinstance(m, bnb.nn.Linear4bit)]
    q_proj = raw.model.layers[0].self_attn.q_proj
    before = q_proj.weight.data.clone()
    q_proj.weight.data, q_proj.weight.quant_state = functional._convert_weight_packed_for_cpu(
        q_proj.weight.data, q_proj.weight.quant_state)
    assert q_proj.weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="1 bitsandbytes 4-bit layers had been repacked"):
        model = get_peft_model(raw, lamda())
    assert not q_proj.weight.quant_state.packing_format_for_cpu and torch.equal(q_proj.weight.data, before)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers) and len(layers) == 14
    # an evaluation pass, then training: gradients reach the first layer's core as in the never-repacked model
    k_proj = reference.base_model.model.model.layers[0].self_attn.k_proj  # not targeted: the repack is off there too
    assert k_proj.support_avx512bf16_for_cpu is False
    grads = []
    for m in (reference, model):
        m.eval()
        with torch.no_grad():
            m(input_ids)
        assert not any(getattr(l.weight.quant_state, "packing_format_for_cpu", False)
                       for l in m.modules() if isinstance(l, bnb.nn.Linear4bit))
        m.train()
        m(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(m.base_model.model.model.layers[0].self_attn.v_proj.lamda_S["default"].grad)
    # close, not equal: the undone repack rounded q_proj's scales. With bnb's repack left on, the eval pass would
    # cut the gradient paths through every 4-bit layer and this relative difference would be about 1.
    assert grads[0].abs().sum() > 0 and (grads[1] - grads[0]).norm() / grads[0].norm() < 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_spectral_init_decomposes_the_dequantized_weight(tiny_dir, bits):
    model = get_peft_model(load(tiny_dir, bits), lamda())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    base = layer.get_base_layer()
    if bits == 4:
        w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    else:
        w = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB).double()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    A, B0S0 = layer.lamda_A["default"].double(), layer.lamda_B0S0["default"].double()
    product = layer.scaling["default"] * B0S0 @ A
    assert torch.allclose(product, top, atol=1e-5)
    # ... and not the full-precision weight's (which the quantized model never multiplies by)
    w_float = AutoModelForCausalLM.from_pretrained(tiny_dir).model.layers[1].mlp.down_proj.weight.double()
    U, S, Vh = torch.linalg.svd(w_float, full_matrices=False)
    assert (product - U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]).abs().max() > 1e-4


def test_factor_a_lives_in_the_compute_dtype(tiny_dir):
    model = get_peft_model(load(tiny_dir, 4, compute_dtype=torch.bfloat16), lamda())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.get_base_layer().weight.dtype == torch.uint8
    assert layer.lamda_A["default"].dtype == torch.bfloat16
    assert layer.lamda_S["default"].dtype == layer.lamda_B["default"].dtype == torch.float32
    fa = get_peft_model(load(tiny_dir, 4, compute_dtype=torch.bfloat16), lorafa())
    assert fa.base_model.model.model.layers[0].self_attn.q_proj.lorafa_A["default"].dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantizes_the_sum_with_a_warning(tiny_dir, input_ids, bits):
    model = get_peft_model(load(tiny_dir, bits), lamda())
    train_steps(model, input_ids)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    expected_float = dense_weight(base).float() + layer.get_delta_weight("default")
    # independent reference: bitsandbytes' own quantization of W0 + delta W, dequantized again
    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(expected_float, quant_type="nf4", blocksize=base.weight.blocksize)
        expected = bnb.functional.dequantize_4bit(packed, state)
    else:
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(expected_float.half())
        expected = bnb.functional.int8_vectorwise_dequant(rows, scales)
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge_adapter()
    assert type(base.weight).__name__ == type(layer.get_base_layer().weight).__name__
    assert torch.allclose(dense_weight(layer.get_base_layer()).float(), expected.float(), atol=1e-6)


def test_save_and_reload_on_a_quantized_base_is_exact(tiny_dir, input_ids, tmp_path):
    model = get_peft_model(load(tiny_dir, 4), lamda(init="spectral"))
    train_steps(model, input_ids)
    with torch.no_grad():
        trained = model(input_ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LAMDA"
    reloaded = PeftModel.from_pretrained(load(tiny_dir, 4), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, trained)


def test_memory_counts_the_packed_weight_and_its_state(tiny_dir, input_ids):
    float_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lamda())
    quantized = get_peft_model(load(tiny_dir, 4), lamda())
    batch = {"input_ids": input_ids, "labels": input_ids}
    full, q4 = measure_training_step(float_model, batch), measure_training_step(quantized, batch)
    # every Linear4bit of the tiny LLaMA (all 7 projections x 2 layers): d_out d_in / 2 bytes packed, plus one
    # float32 absmax per block of 64 weights and the 16-entry NF4 code (no double quantization by default)
    linears = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14
    numel = sum(m.in_features * m.out_features for m in linears)
    state = sum(m.in_features * m.out_features // 64 * 4 + 16 * 4 for m in linears)
    assert quantization_state_bytes(quantized) == state
    assert full.parameter_bytes - q4.parameter_bytes == numel * 4 - (numel // 2 + state)
    assert q4.gradient_bytes == full.gradient_bytes and q4.trainable_parameters == full.trainable_parameters


def test_planner_knows_the_bytes_of_a_4bit_base(tiny_dir, input_ids, capsys):
    """``prepare_model(load_in_4bit=True)`` (``lamda-peft report --load-in-4bit``), from the config alone, gives
    the bytes the real 4-bit model holds: its parameters (packed weights, full-precision embeddings, norms and head)
    plus the quantization state; and the training step estimate equals the one measured on that model."""
    from transformers import AutoConfig

    from lamda_peft.cli import main as cli_main
    from lamda_peft.memory import estimate_training_step, prepare_model

    config = AutoConfig.from_pretrained(tiny_dir)
    real = load(tiny_dir, 4)
    held = sum(p.numel() * p.element_size() for p in real.parameters()) + quantization_state_bytes(real)
    assert prepare_model(config, 2, 12, r=4, load_in_4bit=True).parameter_bytes == held
    assert prepare_model(config, 2, 12, r=4).parameter_bytes > held  # the float base really is larger
    measured = measure_training_step(get_peft_model(real, lamda()), {"input_ids": input_ids, "labels": input_ids})
    estimated = estimate_training_step(config, *input_ids.shape, method="lamda", r=4, targets=TARGETS,
                                       load_in_4bit=True)
    assert estimated.parameter_bytes == measured.parameter_bytes
    totals = {}
    for flag in ([], ["--load-in-4bit"]):
        assert cli_main(["report", tiny_dir, "--r", "4", "--batch", "2", "--seq", "9", "--dtype", "fp32", "--json",
                         *flag]) == 0
        totals[bool(flag)] = json.loads(capsys.readouterr().out)[0]["accounted_bytes"]
    float_bytes = prepare_model(config, 2, 9, r=4).parameter_bytes
    assert totals[False] - totals[True] == float_bytes - held  # the report's totals move by the base's bytes alone


@pytest.mark.slow
def test_smollm2_in_4bit_trains_and_reloads(smollm2_path, tmp_path):
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    base = load(smollm2_path, 4)
    fresh = copy.deepcopy(base)  # a second untouched 4-bit base, without quantizing the checkpoint again
    with torch.no_grad():
        reference = base(ids).logits
    model = get_peft_model(base, LamdaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    train_steps(model, ids, steps=1)
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.equal(trained, reference)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained)


def test_cli_train_load_in_4bit(tiny_chat_model, tmp_path, capsys):
    from lamda_peft.cli import main


    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}. #### {2 * i}"} for i in range(6)]
    data, held_out = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    held_out.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--train-file", str(data), "--validation-file", str(held_out), "--model", tiny_chat_model,
            "--target-modules", "q_proj", "v_proj", "--max-steps", "1", "--batch-size", "2", "--max-length", "64",
            "--eval-steps", "1", "--output-dir", str(out)]
    assert main([*argv, "--method", "full", "--load-in-4bit"]) == 2
    assert "--load-in-4bit cannot train --method full" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--load-in-4bit"]) == 0
    run = json.loads((out / "metrics.json").read_text())
    assert run["config"]["load_in_4bit"] is True
    # the real bytes: each 4-bit Linear d_out d_in / 2 packed + a float32 absmax per 64 weights + the 16-entry NF4
    # code; everything else (embeddings, norms) float32; plus the adapter's trainable S and B (float32)
    from transformers import AutoConfig

    with torch.device("meta"):
        float_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_chat_model))
    linears = [m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    quantized = sum(m.weight.numel() for m in linears)
    expected = (4 * (sum(p.numel() for p in float_model.parameters()) - quantized) + quantized // 2
                + quantized // 64 * 4 + 64 * len(linears) + 4 * run["trainable_params"]["start"])
    assert run["accounted_memory_bytes"]["parameters"] == expected
