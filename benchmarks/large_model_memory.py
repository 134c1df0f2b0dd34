"""Memory per rank of LaMDA on each large-model path (issue 11), SmolLM2-135M, against one process.

    python benchmarks/large_model_memory.py            # every path; writes docs/results/large_model_memory.{md,json}
    python benchmarks/large_model_memory.py --paths zero3 fsdp2

Paths: one process (LoRA for reference, LaMDA), LaMDA on a 4-bit NF4 base, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 through
accelerate; the distributed ones with 2 processes (torchrun, gloo on CPU). Every path: all linear modules, r=16,
float32, AdamW, batch 2 x 128 tokens, 3 optimizer steps with the freezing schedule attached (T = 100, so B is still
training: the phase with the most adapter state). Per rank, counted from the tensors each process holds after the
steps:

- base: the base model's parameters and buffers it holds (ZeRO-3: its partition, plus small "persistent" ones
  whole; FSDP2: its shard; 4-bit: the packed weights plus their quantization state);
- adapter: the adapter's parameters and frozen factors it holds;
- optimizer: AdamW's state plus, under DeepSpeed, ZeRO's fp32 master partitions;
- peak RSS: the process's peak resident memory (``ru_maxrss``: includes Python, the libraries, the load and the
  activations; on CPU the model's own bytes are a small part of it for a 135M model).

On a GPU the same script reports ``torch.cuda.max_memory_allocated`` per rank as well.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
PATHS = ("lora", "lamda", "lamda_4bit", "zero2", "zero3", "fsdp2")
DISTRIBUTED = {"zero2": 29671, "zero3": 29672, "fsdp2": 29673}
R, BATCH, SEQ, STEPS, T = 16, 2, 128, 3, 100
MB = 10**6


def held_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` this process holds: a ZeRO-3 partition (plus the whole tensor while gathered), an FSDP2 shard,
    else the tensor."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor.numel() * t.ds_tensor.element_size() + t.numel() * t.element_size()
    if callable(getattr(t, "to_local", None)):
        t = t.to_local()
    return t.numel() * t.element_size()


def count(model, inner_optimizer, zero) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lamda_peft.tuners.quantized import quantization_state_bytes

    adapter_ids = set()  # from each PEFT layer's registered containers (ours and stock LoRA's)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in (*module.adapter_layer_names, *module.other_param_names):
                container = getattr(module, name, None)
                if isinstance(container, torch.nn.Module):  # ModuleDict (LoRA), BufferDict (frozen factors)
                    adapter_ids |= {id(t) for t in [*container.parameters(), *container.buffers()]}
                elif isinstance(container, (torch.nn.ParameterDict, dict)):
                    adapter_ids |= {id(t) for t in container.values() if torch.is_tensor(t)}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    adapter = sum(held_bytes(t) for i, t in tensors.items() if i in adapter_ids)
    base = sum(held_bytes(t) for i, t in tensors.items() if i not in adapter_ids) + quantization_state_bytes(model)
    state = sum(held_bytes(v) for s in inner_optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    if zero is not None:  # ZeRO's fp32 master partitions (stage 1/2, stage 3)
        masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat")
        state += sum(m.numel() * m.element_size() for m in masters)
    return {"base": base, "adapter": adapter, "optimizer": state}


def config(path: str):
    from peft import LoraConfig

    from lamda_peft import LamdaConfig

    common = dict(r=R, lora_alpha=2 * R, target_modules="all-linear", task_type="CAUSAL_LM")
    return LoraConfig(**common) if path == "lora" else LamdaConfig(**common)


def skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (minutes); gloo's is enough here.
    (``deepspeed.comm`` has an attribute ``torch``, so the module is taken from sys.modules.)"""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def worker(path: str) -> None:
    torch.set_num_threads(1)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lamda_peft import attach_freezing
    from lamda_peft.apps.models import smollm2_path

    checkpoint, zero, rank = smollm2_path(), None, 0
    cuda = torch.cuda.is_available()
    if path.startswith("zero"):
        import deepspeed
        import torch.distributed as dist
        from transformers.integrations import HfDeepSpeedConfig

        skip_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        rank = dist.get_rank()
        ds_config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": int(path[-1])}, "zero_allow_untested_optimizer": True}
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (ZeRO-3: from_pretrained loads partitioned)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config(path))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        freezer = attach_freezing(engine, zero, total_steps=T)
        inner, forward, backward, step = zero.optimizer, engine, engine.backward, engine.step
    elif path == "fsdp2":
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        accelerator = Accelerator(cpu=not cuda, fsdp_plugin=plugin)
        if not cuda:  # accelerate falls back to DDP on CPU; run its FSDP2 code anyway (gloo)
            accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
        rank = accelerator.process_index
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config(path))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        freezer = attach_freezing(model, optimizer, total_steps=T)
        inner, forward, backward, step = optimizer.optimizer, model, accelerator.backward, optimizer.step
    else:
        load = {}
        if path == "lamda_4bit":
            from lamda_peft.cli.quantized_base import nf4_config

            load = {"quantization_config": nf4_config(torch.float32)}
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **load),
                               config(path))
        if cuda:
            model.cuda()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        freezer = attach_freezing(model, optimizer, total_steps=T) if path != "lora" else None
        inner, forward, backward, step = optimizer, model, lambda loss: loss.backward(), optimizer.step
    device = "cuda" if cuda else "cpu"
    for i in range(STEPS):
        ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(10 * i + rank)).to(device)
        backward(forward(input_ids=ids, labels=ids).loss)
        step()
        if path in ("lora", "lamda", "lamda_4bit", "fsdp2"):
            optimizer.zero_grad()
    figures = count(model, inner, zero)
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        figures["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    figures["frozen_fraction"] = freezer.frozen_fraction if freezer else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, figures)
    else:
        everyone = [figures]
    if rank == 0:
        print("RESULT " + json.dumps({"path": path, "ranks": everyone}), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # gloo's teardown now and then hangs (pytorch#75097)


def run(path: str) -> dict:
    script = str(Path(__file__).resolve())
    if path in DISTRIBUTED:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={DISTRIBUTED[path]}", script, "--worker", path]
    else:
        command = [sys.executable, script, "--worker", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{path} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[0])


LABELS = {"lora": "LoRA, one process", "lamda": "LaMDA, one process", "lamda_4bit": "LaMDA, 4-bit NF4 base",
          "zero2": "LaMDA, ZeRO-2, 2 ranks", "zero3": "LaMDA, ZeRO-3, 2 ranks", "fsdp2": "LaMDA, FSDP2 (accelerate), 2 ranks"}


def report(results: list[dict]) -> str:
    lines = ["| path | base held, MB | adapter held, MB | optimizer (+ZeRO master), MB | sum, MB | peak RSS, MB |",
             "|---|---|---|---|---|---|"]
    for result in results:
        rank0 = result["ranks"][0]
        total = rank0["base"] + rank0["adapter"] + rank0["optimizer"]
        lines.append(f"| {LABELS[result['path']]} (rank 0) | {rank0['base'] / MB:.1f} | {rank0['adapter'] / MB:.1f} "
                     f"| {rank0['optimizer'] / MB:.1f} | {total / MB:.1f} | {rank0['peak_rss'] / MB:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts.worker)
    log = OUT / "large_model_memory.json"  # a rerun of some paths keeps the others' last results
    kept = {r["path"]: r for r in json.loads(log.read_text())["results"]} if log.exists() else {}
    for path in opts.paths:
        print(f"{path} ...", flush=True)
        kept[path] = run(path)
    results = [kept[path] for path in PATHS if path in kept]
    table = report(results)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    command = "python benchmarks/large_model_memory.py"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "large_model_memory.json").write_text(json.dumps(
        {"command": command, "machine": machine, "settings": {"r": R, "batch": BATCH, "seq": SEQ, "steps": STEPS},
         "results": results}, indent=2) + "\n")
    (OUT / "large_model_memory.md").write_text(
        f"# Memory per rank on each large-model path (SmolLM2-135M)\n\nCommand: `{command}`; machine: {machine}.\n"
        f"All linear modules, r={R}, float32, AdamW, batch {BATCH} x {SEQ} tokens, {STEPS} steps with B training. "
        "Counted from the tensors rank 0 holds after the steps (see the script's docstring); peak RSS is the whole "
        "process.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
