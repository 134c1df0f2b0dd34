"""One rank of the DeepSpeed test, started by tests/test_deepspeed.py under torchrun (gloo, CPU).

    torchrun --nproc_per_node=2 tests/deepspeed_worker.py {zero2,zero3} OUT_DIR

Builds a tiny LLaMA (loaded with from_pretrained, so under ZeRO-3 it is partitioned while loading) with a LaMDA
adapter, checks the spectral factors against a single-process reference built from the same checkpoint, trains 3
steps, saves the adapter with its parameters gathered and
writes rank 0's logits, so the test can reload the adapter without DeepSpeed and compare. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

T = 3


def main(stage: int, out: Path) -> None:
    import deepspeed
    import deepspeed.comm.torch as ds_torch
    import torch.distributed as dist

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce at init (a C++ build of minutes on a
    # busy CI machine); gloo's all-reduce is enough for a test.
    ds_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lamda_peft import LamdaConfig, LamdaLayer

    checkpoint = out / "base"
    if rank == 0:
        make_tiny_llama(seed=0).save_pretrained(checkpoint)
    dist.barrier()
    config = LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear")
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), config)  # no DeepSpeed

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: from_pretrained partitions under ZeRO-3)
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    partitioned = base.model.layers[0].self_attn.q_proj.weight.numel() == 0
    model = get_peft_model(base, config)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, LamdaLayer)}
    init_equal = all(torch.equal(ours[n].lamda_A["default"], theirs[n].lamda_A["default"])
                     and torch.equal(ours[n].lamda_B0S0["default"], theirs[n].lamda_B0S0["default"]) for n in ours)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # attach_freezing is not used here: ZeRO's optimizer holds flattened partitions, not B itself, and the
    # freezing schedule refuses such an optimizer (see docs/large_models.md).
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(T):
        ids = torch.randint(0, 128, (2, 9), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    adapter_params = [p for n, p in model.named_parameters() if "lamda_" in n]
    with deepspeed.zero.GatheredParameters(adapter_params, modifier_rank=None):
        vec = torch.cat([p.detach().flatten() for p in adapter_params])
        if rank == 0:
            model.save_pretrained(out / "adapter")
    gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vec)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, out / "logits.pt")
        print(json.dumps({"stage": stage, "partitioned": partitioned, "init_equal_reference": init_equal,
                          "ranks_equal": all(torch.equal(gathered[0], v) for v in gathered[1:])}), flush=True)
    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # gloo's teardown now and then hangs (pytorch#75097); the work is done and checked


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main({"zero2": 2, "zero3": 3}[sys.argv[1]], Path(sys.argv[2]))
