"""LaMDA on a 4-bit NF4 SmolLM2 (QLoRA-style): step 0 is exactly the quantized model, then a few steps.

    python examples/qlora_4bit.py          # needs pip install -e ".[quant]"
"""

import importlib.util
import sys

if importlib.util.find_spec("bitsandbytes") is None:  # one line, naming the extra, instead of a traceback
    sys.exit("examples/qlora_4bit.py needs bitsandbytes: pip install 'lamda-peft[quant]'")

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lamda_peft import LamdaConfig, attach_freezing, keep_training_layout
from lamda_peft.apps.models import smollm2_path
from lamda_peft.cli.quantized_base import nf4_config

path = smollm2_path()
base = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config())  # bf16 compute on a GPU
# On an AVX512-BF16 CPU bitsandbytes would repack the weights at the reference pass below, a layout gradients do
# not pass through; adding the adapter switches that off anyway, this keeps the reference on the same weights.
keep_training_layout(base)
tokenizer = AutoTokenizer.from_pretrained(path)
batch = tokenizer(["Question: what is 3 plus 3? Answer: 6."], return_tensors="pt").to(base.device)
with torch.no_grad():
    before = base(**batch).logits
model = get_peft_model(base, LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
with torch.no_grad():
    print("step 0 equals the 4-bit model:", torch.equal(model(**batch).logits, before))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
freezer = attach_freezing(model, optimizer, total_steps=10)
for step in range(10):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step(), optimizer.zero_grad()
print(f"loss after 10 steps: {loss.item():.3f}; B frozen: {freezer.frozen_fraction:.0%}")
model.save_pretrained("runs/qlora/adapter")  # loads on the 4-bit base (exact) or the full-precision one
