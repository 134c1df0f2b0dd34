"""Export a LaMDA++ adapter as a stock LoRA adapter that vLLM serves, and check vLLM's rules on it.

    python examples/export_vllm.py
    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules lamda=runs/vllm/lora --max-lora-rank 16
"""

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lamda_peft import LamdaConfig, export_lora
from lamda_peft.apps.models import smollm2_path
from lamda_peft.serving import smallest_max_lora_rank, vllm_problems

path = smollm2_path()
model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                       LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                   rank_allocation="energy"))  # LaMDA++: a rank per module
with torch.no_grad():  # stand-in for training: move S away from the identity
    for name, p in model.named_parameters():
        if "lamda_S" in name:
            p.add_(0.01 * torch.randn_like(p))
export_lora(model, "runs/vllm/lora", for_vllm=True)  # refuses (nothing written) what vLLM cannot serve
ranks = [m.r["default"] for m in model.modules() if hasattr(m, "lamda_S")]
print("max rank", max(ranks), "-> --max-lora-rank", smallest_max_lora_rank(max(ranks)))
print("vLLM problems:", vllm_problems("runs/vllm/lora", smallest_max_lora_rank(max(ranks))) or "none")
ids = torch.tensor([[1, 2, 3, 4]])
lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), "runs/vllm/lora")
with torch.no_grad():
    diff = (lora(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
print(f"stock PEFT LoRA vs the LaMDA++ model: max |logit difference| {diff:.2e}")
