"""LaMDA with TRL's SFTTrainer on SmolLM2 (TRL's defaults: gradient checkpointing on), then an exact reload.

    python examples/trl_sft.py
"""

import importlib.util
import sys

if importlib.util.find_spec("trl") is None:  # one line, naming the extra, instead of a traceback
    sys.exit("examples/trl_sft.py needs TRL: pip install 'lamda-peft[trl]'")

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from lamda_peft import LamdaCallback, LamdaConfig
from lamda_peft.apps.models import smollm2_path

path = smollm2_path()  # or a Hub id
data = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                        {"role": "assistant", "content": f"{2 * i}."}]} for i in range(16)])
trainer = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
    args=SFTConfig(output_dir="runs/sft", max_steps=8, per_device_train_batch_size=2, max_length=64,
                   learning_rate=1e-3, logging_steps=4, bf16=False, report_to="none", save_strategy="no"),
    train_dataset=data,
    processing_class=AutoTokenizer.from_pretrained(path),
    peft_config=LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    callbacks=[LamdaCallback()],  # LaMDA's freezing of B (not needed for LoRA-FA)
)
trainer.train()
trainer.model.save_pretrained("runs/sft/adapter")

ids = torch.tensor([[1, 2, 3, 4]])
trained = trainer.model.eval()
reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                     "runs/sft/adapter").eval()
with torch.no_grad():
    print("reload exact:", torch.equal(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits))
