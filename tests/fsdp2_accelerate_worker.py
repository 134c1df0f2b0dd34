"""One rank of the FSDP2-through-accelerate test (tests/test_fsdp2_accelerate.py), under torchrun (gloo, CPU).

    torchrun --nproc_per_node=2 tests/fsdp2_accelerate_worker.py {lamda,lorafa} OUT_DIR

The base is built on the meta device, the adapter added there (its init deferred), the weights loaded afterwards
(``to_empty`` + ``load_state_dict``), then ``accelerate`` shards it with FSDP2 (its ``FullyShardedDataParallelPlugin``,
what the Trainer's ``fsdp`` settings build) and trains T steps, LaMDA with the freezing schedule attached to
accelerate's optimizer. The adapter is saved from the full state dict (``get_model_state_dict``) on rank 0,
with rank 0's logits, so the test can reload it without FSDP and compare. Rank 0 prints one JSON line: whether the
frozen factors equal those of the same adapter built on a normally loaded base, whether the loss stayed finite, and
(LaMDA) whether every column of B held its value from the step it froze on, and whether B was released.
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


T = 6


def force_fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate turns FSDP on only for accelerator devices (GPU, XPU, ...): on CPU it silently falls back to DDP
    (``MULTI_CPU``). Mark the shared state as FSDP, so ``prepare`` runs accelerate's own ``fsdp2_prepare_model``, the
    code a GPU run goes through; gloo carries its collectives."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    assert accelerator.is_fsdp2, "accelerate did not take the FSDP2 plugin"


def main(method: str, out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig, attach_freezing
    from lamda_peft.tuners.base_layer import LowRankDeltaLayer

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    force_fsdp_on_cpu(accelerator, plugin)
    make = LamdaConfig if method == "lamda" else LoraFAConfig
    config = make(r=4, lora_alpha=8, target_modules="all-linear")
    with torch.device("meta"):
        model = get_peft_model(make_tiny_llama(seed=0), config)
    model.to_empty(device="cpu")
    # to_empty leaves every tensor uninitialised, and load_state_dict fills only the persistent ones: the rotary
    # embedding's inv_freq (a non-persistent buffer) must be recomputed, which transformers' init_weights does.
    model.base_model.model.init_weights()
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
    freezer = attach_freezing(model, optimizer, total_steps=T) if method == "lamda" else None

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def b_whole() -> dict[str, torch.Tensor]:  # a collective under FSDP2 (full_tensor)
        return {n: full(m.lamda_B["default"]).detach().clone() for n, m in model.named_modules()
                if isinstance(m, LamdaLayer)}

    history, finite = [], True
    for step in range(T):
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(10 * step + accelerator.process_index))
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step(), optimizer.zero_grad()
        finite &= math.isfinite(float(loss))
        if method == "lamda":
            history.append(b_whole())
    frozen_exact = True
    for step, snapshot in enumerate(history):  # r 4, freeze_ratio 0.3 (default), T 6: k = 2, 4 after steps 1, 2
        k = min(4, (4 * (step + 1) * 10) // (3 * T))
        frozen_exact &= all(torch.equal(h[n][:, :k], snapshot[n][:, :k]) for h in history[step:] for n in snapshot)
    # The full state dict on rank 0 (a collective). accelerator.get_state_dict(model) returns DTensors with freed
    # storage here (accelerate 1.15, broadcast_from_rank0=True; huggingface/accelerate#3487), hence the torch call.
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out / "adapter", state_dict=state_dict)
        torch.save({"ids": ids, "logits": logits}, out / "logits.pt")

    ours = {n[n.index("base_model"):].replace("_fsdp_wrapped_module.", ""): m
            for n, m in model.named_modules() if isinstance(m, LowRankDeltaLayer)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, LowRankDeltaLayer)}
    if method == "lamda":  # deterministic: the spectral factors of the loaded weights (B, S: trained)
        equal = sorted(ours) == sorted(theirs) and all(
            torch.equal(full(getattr(ours[n], name)["default"]), getattr(theirs[n], name)["default"])
            for n in theirs for name in theirs[n].frozen_factor_names)
    else:  # random A, drawn at first use: Kaiming-bounded, and the same on every rank (a replicated buffer)
        A = torch.cat([full(ours[n].lorafa_A["default"]).flatten() for n in sorted(ours)])
        everywhere = accelerator.gather(A[None])
        bound = max(1 / m.in_features ** 0.5 for m in ours.values())
        equal = sorted(ours) == sorted(theirs) and bool((everywhere == A).all()) and 0 < float(A.abs().max()) <= bound
    if accelerator.is_main_process:
        print(json.dumps({"method": method, "frozen_factors_equal": equal, "loss_finite": finite,
                          "layers": len(ours), "frozen_exact": frozen_exact,
                          "freezer": freezer.state() if freezer else None}), flush=True)
    accelerator.wait_for_everyone()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # gloo's teardown now and then hangs (pytorch#75097); the work is done and checked


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
