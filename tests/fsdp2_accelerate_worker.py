"""One rank of the FSDP2-through-accelerate test (tests/test_fsdp2_accelerate.py), under torchrun (gloo, CPU).

    torchrun --nproc_per_node=2 tests/fsdp2_accelerate_worker.py {lamda,lorafa}

The base is built on the meta device, the adapter added there (its init deferred), the weights loaded afterwards
(``to_empty`` + ``load_state_dict``), then ``accelerate`` shards it with FSDP2 (its ``FullyShardedDataParallelPlugin``,
what the Trainer's ``fsdp`` settings build) and trains one step. Rank 0 prints one JSON line: whether the frozen
factors equal those of the same adapter built on a normally loaded base, and whether the loss is finite.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402


def main(method: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import get_peft_model

    from lamda_peft import LamdaConfig, LoraFAConfig
    from lamda_peft.tuners.base_layer import LowRankDeltaLayer

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    make = LamdaConfig if method == "lamda" else LoraFAConfig
    config = make(r=4, lora_alpha=8, target_modules="all-linear")
    with torch.device("meta"):
        model = get_peft_model(make_tiny_llama(seed=0), config)
    model.to_empty(device="cpu")
    pretrained = make_tiny_llama(seed=0).state_dict()
    wrapped = {n for n, m in model.base_model.model.named_modules() if isinstance(m, LowRankDeltaLayer)}
    remapped = {}
    for key, value in pretrained.items():  # an adapted module keeps its base weight under .base_layer
        module, _, leaf = key.rpartition(".")
        remapped[f"{module}.base_layer.{leaf}" if module in wrapped else key] = value
    loaded = model.base_model.model.load_state_dict(remapped, strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    torch.manual_seed(0)
    reference = get_peft_model(make_tiny_llama(seed=0), config)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(accelerator.process_index))
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    ours = {n[n.index("base_model"):].replace("_fsdp_wrapped_module.", ""): m
            for n, m in model.named_modules() if isinstance(m, LowRankDeltaLayer)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, LowRankDeltaLayer)}
    if method == "lamda":  # deterministic: the spectral factors of the loaded weights
        equal = sorted(ours) == sorted(theirs) and all(
            torch.equal(full(getattr(ours[n], name)["default"]), getattr(theirs[n], name)["default"])
            for n in theirs for name in theirs[n].frozen_factor_names)
    else:  # random A, drawn at first use: Kaiming-bounded, and the same on every rank (a replicated buffer)
        A = torch.cat([full(ours[n].lorafa_A["default"]).flatten() for n in sorted(ours)])
        everywhere = accelerator.gather(A[None])
        bound = max(1 / m.in_features ** 0.5 for m in ours.values())
        equal = sorted(ours) == sorted(theirs) and bool((everywhere == A).all()) and 0 < float(A.abs().max()) <= bound
    if accelerator.is_main_process:
        print(json.dumps({"method": method, "frozen_factors_equal": equal, "loss_finite": math.isfinite(float(loss)),
                          "layers": len(ours)}), flush=True)
    accelerator.wait_for_everyone()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # gloo's teardown now and then hangs (pytorch#75097); the work is done and checked


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1])
