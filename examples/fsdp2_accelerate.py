"""LaMDA on SmolLM2 under FSDP2 through accelerate, the base built on the meta device and loaded afterwards.

    torchrun --nproc_per_node=2 examples/fsdp2_accelerate.py       # or: accelerate launch --use_fsdp --fsdp_version 2 ...

The path of a model too large for one device's memory: no rank materialises the random init. LaMDA defers its
spectral init while the base is on meta and runs it on first use from the loaded weights; the freezing schedule
runs on accelerate's optimizer and releases B once frozen; the adapter is saved from the full state dict.
"""

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import get_peft_model
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lamda_peft import LamdaConfig, attach_freezing
from lamda_peft.apps.models import smollm2_path
from lamda_peft.tuners.base_layer import LowRankDeltaLayer

STEPS = 20
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                        transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
if not torch.cuda.is_available():  # accelerate enables FSDP only on GPUs (DDP on CPU); use its FSDP2 code with gloo
    accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin

path = smollm2_path()  # a local folder with model.safetensors (download a Hub model first)
with torch.device("meta"):
    model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)),
                           LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
model.to_empty(device="cpu")
model.base_model.model.init_weights()  # non-persistent buffers (RoPE's inv_freq); the weights come next
adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, LowRankDeltaLayer)}
weights = {}
for key, value in load_file(Path(path) / "model.safetensors").items():  # adapted modules keep theirs in .base_layer
    module, _, leaf = key.rpartition(".")
    weights[f"{module}.base_layer.{leaf}" if module in adapted else key] = value
missing = model.base_model.model.load_state_dict(weights, strict=False).missing_keys
assert all("lamda_" in k or k == "lm_head.weight" for k in missing), missing  # lm_head is tied to the embeddings

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
freezer = attach_freezing(model, optimizer, total_steps=STEPS)
tokenizer = AutoTokenizer.from_pretrained(path)
losses = []
for step in range(STEPS):
    i = (2 * step + accelerator.process_index) % 8  # 8 examples, seen again and again: the loss must fall
    batch = tokenizer([f"Question: what is {i} plus {i}? Answer: {2 * i}."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    accelerator.backward(loss)
    optimizer.step(), optimizer.zero_grad()
    losses.append(loss.item())
    if step % 5 == 4 and accelerator.is_main_process:
        print(f"steps {step - 3}-{step + 1}: mean loss {sum(losses[-5:]) / 5:.3f}, B frozen "
              f"{freezer.frozen_fraction:.0%}, released {freezer.released}", flush=True)

state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # all ranks
if accelerator.is_main_process:
    accelerator.unwrap_model(model).save_pretrained("runs/fsdp2/adapter", state_dict=state_dict)
    print("saved runs/fsdp2/adapter")
accelerator.wait_for_everyone()
