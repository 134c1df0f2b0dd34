"""Step time and memory of LaMDA, LoRA-FA and stock PEFT LoRA under TRL's SFTTrainer (issue 11), and of LaMDA on a
4-bit base.

    python benchmarks/trl_sft.py --rounds 6

SmolLM2-135M, all linear modules, r=16, SFTConfig defaults (gradient checkpointing on) except bf16 (float32: bf16
autocast on a CPU without bf16 units measures the autocast, not the method). Each method gets its own SFTTrainer;
its ``training_step`` (forward, backward) plus the optimizer step are timed with the methods interleaved step by
step on the same batch, so the machine's drift cancels; the figure is the median over rounds of the per-round ratio
to LoRA. Memory: ``lamda_peft.memory.measure_training_step`` on the trainer's model (gradient checkpointing on).
Writes docs/results/trl_sft.{md,json}, with the machine's load average (a busy machine is flagged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from lamda_peft import LamdaConfig, LoraFAConfig
from lamda_peft.apps.models import smollm2_path
from lamda_peft.callbacks import restore_float32_factors
from lamda_peft.cli.quantized_base import nf4_config
from lamda_peft.memory import MB, measure_training_step

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
COMMON = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
METHODS = {
    "lora": lambda: LoraConfig(**COMMON),
    "lorafa": lambda: LoraFAConfig(**COMMON),
    "lamda": lambda: LamdaConfig(**COMMON),
    "lamda_4bit_base": lambda: LamdaConfig(**COMMON),
}


def rows(n: int) -> Dataset:
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 3
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"Question {i}: {text}"},
                                            {"role": "assistant", "content": f"Answer {i}: {text}"}]}
                              for i in range(n)])


def build(method: str, path: str, seq: int, batch: int) -> SFTTrainer:
    load = {"quantization_config": nf4_config(torch.float32)} if method.endswith("4bit_base") else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load)
    args = SFTConfig(output_dir=f"/tmp/trl_sft_bench/{method}", max_steps=1, per_device_train_batch_size=batch,
                     max_length=seq, bf16=False, report_to="none", save_strategy="no", use_cpu=True,
                     learning_rate=1e-4)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(batch * 2),
                         processing_class=AutoTokenizer.from_pretrained(path), peft_config=METHODS[method]())
    if method.startswith("lamda"):  # what LamdaCallback does at on_train_begin: TRL cast S and B to bf16 on a
        restore_float32_factors(trainer.model, fresh=True)  # quantized base; lamda_peft keeps them in float32
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's own loop, which this benchmark replaces
    return trainer


def one_step(trainer: SFTTrainer, batch: dict) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = smollm2_path()
    load_before = os.getloadavg()
    trainers = {m: build(m, path, args.seq, args.batch) for m in METHODS}
    batches = {m: next(iter(t.get_train_dataloader())) for m, t in trainers.items()}
    for m, t in trainers.items():  # warm-up
        one_step(t, batches[m])
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m, t in trainers.items():
            times[m].append(one_step(t, batches[m]))
    memory = {}
    for m, t in trainers.items():
        batch = {k: v for k, v in batches[m].items() if k in ("input_ids", "attention_mask", "labels")}
        memory[m] = measure_training_step(t.model, batch).as_dict()
    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    result = {
        "command": f"python benchmarks/trl_sft.py --rounds {args.rounds} --seq {args.seq} --batch {args.batch}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": load_after,
                    "busy": busy},
        "step_seconds": times,
        "step_ratio_to_lora": {m: statistics.median(a / b for a, b in zip(times[m], times["lora"])) for m in METHODS},
        "memory": memory,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "trl_sft.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# TRL SFTTrainer: step time and memory (SmolLM2-135M, all-linear, r=16, gradient checkpointing on)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']['platform']}, "
             f"{result['machine']['cpus']} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
             + (" -- **the machine was busy: step-time ratios are indicative only**" if busy else ""), "",
             "| method | step time / LoRA (median of rounds) | median step (s) | parameters (MB) | trainable | "
             "gradients + AdamW (MB) | saved activations (MB) | accounted (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        mem = memory[m]
        lines.append(f"| {m} | {result['step_ratio_to_lora'][m]:.2f} | {statistics.median(times[m]):.2f} | "
                     f"{mem['parameter_bytes'] / MB:.1f} | {mem['trainable_parameters']:,} | "
                     f"{(mem['gradient_bytes'] + mem['optimizer_state_bytes']) / MB:.1f} | "
                     f"{mem['saved_bytes'] / MB:.1f} | {mem['accounted_bytes'] / MB:.1f} |")
    lines += ["", "LaMDA's B trains throughout (no freezing callback here): the slowest LaMDA phase. The LaMDA rows keep S and B in float32 (restored after TRL's bf16 cast on the quantized base, as LamdaCallback does). The 4-bit row keeps "
              "the base in NF4 (bitsandbytes on CPU dequantizes each weight per matmul, so its time is not a GPU's)."]
    (OUT / "trl_sft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
