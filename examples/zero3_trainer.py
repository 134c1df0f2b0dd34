"""LaMDA on SmolLM2 under DeepSpeed ZeRO-3 with the transformers Trainer, the freezing schedule and save_model.

    torchrun --nproc_per_node=2 examples/zero3_trainer.py          # or: accelerate launch --num_processes 2 ...

The base loads partitioned (the ZeRO-3 config in TrainingArguments is read by from_pretrained), every rank builds
the same adapter from the gathered weights, ``LamdaCallback`` freezes B on ZeRO's optimizer, and ``save_model``
writes the whole adapter, which ``PeftModel.from_pretrained`` loads without DeepSpeed. On a CPU machine it runs
with gloo (slowly); on GPUs with NCCL.
"""

import importlib
import importlib.util
import sys

if importlib.util.find_spec("deepspeed") is None:  # one line, naming the extra, instead of a traceback
    sys.exit("examples/zero3_trainer.py needs DeepSpeed: pip install --no-build-isolation 'lamda-peft[deepspeed]'")

import torch
from peft import get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

from lamda_peft import LamdaCallback, LamdaConfig
from lamda_peft.apps.models import smollm2_path

CPU = not torch.cuda.is_available()
if CPU:  # DeepSpeed would JIT-compile a shared-memory all-reduce for CPU (minutes); gloo's is enough
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
args = TrainingArguments(output_dir="runs/zero3", per_device_train_batch_size=2, max_steps=20, learning_rate=1e-3,
                         deepspeed=ds_config, logging_steps=5, save_strategy="no", report_to=[], use_cpu=CPU,
                         ddp_backend="gloo" if CPU else None)  # after args: from_pretrained sees the ZeRO-3 config
path = smollm2_path()  # or a Hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                       LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
texts = [f"Question: what is {i} plus {i}? Answer: {2 * i}." for i in range(64)]
data = [tokenizer(t) for t in texts]
lamda = LamdaCallback()
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lamda],
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
trainer.save_model("runs/zero3/adapter")  # the whole adapter (rank 0 writes it)
if trainer.is_world_process_zero():
    print("B frozen:", lamda.freezer.state())
