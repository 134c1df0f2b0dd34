"""TRL's trainers with LaMDA and LoRA-FA: SFTTrainer(peft_config=...) with TRL's defaults, and DPOTrainer.

TRL's SFTConfig defaults: gradient checkpointing on, bf16 autocast (where the device has bf16). Those run on a tiny
random LLaMA (SmolLM2's tokenizer and chat template); the real SmolLM2 run keeps gradient checkpointing but trains
in float32 (bf16 autocast on this CPU is ~6x slower). A reload is compared under the same precision as the forward.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from lamda_peft import LamdaCallback, LamdaConfig, LoraFAConfig, keep_training_layout

trl = pytest.importorskip("trl", reason="needs pip install 'lamda-peft[trl]'")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def chats(n: int = 8) -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
                              for i in range(n)])


def sft(path: str, peft_config, tmp_path, **overrides):
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, max_length=64, report_to="none", save_strategy="no", logging_steps=1,
                         use_cpu=True, **overrides)
    callbacks = [LamdaCallback()] if isinstance(peft_config, LamdaConfig) else []
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=chats(),
                             processing_class=AutoTokenizer.from_pretrained(path), peft_config=peft_config,
                             callbacks=callbacks)
    trainer.train()
    return trainer


def logits(model, ids, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(ids).logits.float()


@pytest.mark.parametrize("make_config", [lambda: LamdaConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
                                         lambda: LoraFAConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM")],
                         ids=["lamda", "lorafa"])
def test_sft_with_trl_defaults_trains_saves_and_reloads_exactly(tiny_chat_model, make_config, tmp_path):
    config = make_config()
    trainer = sft(tiny_chat_model, config, tmp_path)
    args = trainer.args
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults, kept
    model = trainer.model.eval()
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == config.peft_type
    if isinstance(config, LamdaConfig):
        assert trainer.state.log_history[0]["lamda_frozen_columns"] > 0  # the callback ran the freezing schedule
    ids = torch.tensor([[1, 42, 7, 300, 5, 9]])
    trained = logits(model, ids, bf16=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    assert not torch.equal(trained, logits(base, ids, bf16=True))  # the adapter learned something
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded, ids, bf16=True), trained)


@pytest.mark.slow
def test_sft_on_smollm2_with_gradient_checkpointing(smollm2_path, tmp_path):
    trainer = sft(smollm2_path, LamdaConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"), tmp_path,
                  bf16=False)
    assert trainer.args.gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model = trainer.model.eval()
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30]])
    trained = logits(model, ids, bf16=False)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), tmp_path / "adapter")
    assert torch.equal(logits(reloaded.eval(), ids, bf16=False), trained)


def test_dpo_with_an_adapter_model_uses_the_base_as_reference(tiny_chat_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model),
                           LamdaConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    pairs = Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."}
                               for i in range(8)])
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                         bf16=False, max_length=48)
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, processing_class=tokenizer,
                             callbacks=[LamdaCallback()])
    trainer.train()
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    first = trainer.state.log_history[0]
    margin = next(v for k, v in first.items() if "margins" in k)
    assert margin == pytest.approx(0.0, abs=1e-6)  # step 0: policy == reference, since the delta starts at zero
    ids = torch.tensor([[1, 42, 7, 300]])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    model.eval()
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, bf16=False), logits(base, ids, bf16=False))
    assert not torch.equal(logits(model, ids, bf16=False), logits(base, ids, bf16=False))


def test_sft_on_a_4bit_base_keeps_factors_float32_and_step_zero_exact(tiny_chat_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, quantization_config=q)
    # the reference pass must not let bitsandbytes repack the weights for CPU inference (AVX512-BF16 hosts): adding
    # the adapter switches that off and undoes it, which would leave the reference on other weights
    keep_training_layout(base)
    ids = torch.tensor([[1, 42, 7, 300, 5, 9]])
    reference = logits(base, ids, bf16=False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, max_length=64,
                         report_to="none", save_strategy="no", use_cpu=True, bf16=False, learning_rate=0.0)
    trainer = trl.SFTTrainer(model=base, args=args, train_dataset=chats(), peft_config=LamdaConfig(
        r=4, target_modules=TARGETS, task_type="CAUSAL_LM"), callbacks=[LamdaCallback()],
        processing_class=AutoTokenizer.from_pretrained(tiny_chat_model))
    with pytest.warns(UserWarning, match="restored to float32"):
        trainer.train()  # TRL cast S and B to bf16; the callback restores them before the first step
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lamda_B["default"].dtype == layer.lamda_S["default"].dtype == torch.float32
    assert torch.equal(logits(trainer.model.eval(), ids, bf16=False), reference)  # lr 0: still step 0, exactly
