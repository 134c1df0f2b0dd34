"""One rank of the DeepSpeed test, started by tests/test_deepspeed.py under torchrun (gloo, CPU).

    torchrun --nproc_per_node=2 tests/deepspeed_worker.py {zero2,zero3,zero3-energy,zero3-trainer} OUT_DIR

Builds a tiny LLaMA (loaded with from_pretrained, so under ZeRO-3 it is partitioned while loading) with a LaMDA
adapter (zero3-energy: LaMDA++, ranks allocated from the gathered weights, and every B split across the ranks), checks the spectral factors against a
single-process reference built from the same checkpoint, trains T steps with the freezing schedule attached to
ZeRO's optimizer, and trains the reference on the same data in one process (both ranks' batches at once: the same
mean loss). Saves the adapter with its parameters gathered and writes rank 0's logits, so the test can reload the
adapter without DeepSpeed and compare. zero3-trainer: the same through the transformers Trainer (a ZeRO-3 config in
TrainingArguments, LamdaCallback, trainer.save_model). Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

T = 6  # freeze_ratio 0.5, r 4: columns freeze after steps 1, 2, 3 (k = 1, 2, 4), then S trains alone for 3 steps


def skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce when its process group starts (a C++
    build of minutes on a fresh CI machine); gloo's all-reduce is enough for a test. (``import deepspeed.comm.torch
    as m`` would bind the real torch: ``deepspeed.comm`` has an attribute ``torch``; hence sys.modules.)"""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def gathered_b(model, deepspeed) -> dict[str, torch.Tensor]:
    """Every LaMDA B, whole (collective under ZeRO-3)."""
    from lamda_peft import LamdaLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    params = [m.lamda_B["default"] for m in layers.values()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: m.lamda_B["default"].detach().clone() for n, m in layers.items()}


def main(mode: str, out: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lamda_peft import LamdaConfig, LamdaLayer, attach_freezing
    from lamda_peft.integrations.zero_optimizer import full_master_value

    stage = 2 if mode == "zero2" else 3
    checkpoint = out / "base"
    if rank == 0:
        make_tiny_llama(seed=0).save_pretrained(checkpoint)
    dist.barrier()
    def config():  # one per model: LaMDA++ writes its allocation into the config it is given
        return LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", freeze_ratio=0.5,
                           rank_allocation="energy" if mode == "zero3-energy" else "uniform")

    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), config())  # no DeepSpeed

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if mode == "zero3-energy":  # and no small parameter kept whole ("persistent"): every B is split across ranks
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: from_pretrained partitions under ZeRO-3)
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    partitioned = base.model.layers[0].self_attn.q_proj.weight.numel() == 0
    model = get_peft_model(base, config())
    ours = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, LamdaLayer)}
    ranks = {n: m.r["default"] for n, m in ours.items()}
    init_equal = ranks == {n: m.r["default"] for n, m in theirs.items()} and all(
        torch.equal(ours[n].lamda_A["default"], theirs[n].lamda_A["default"])
        and torch.equal(ours[n].lamda_B0S0["default"], theirs[n].lamda_B0S0["default"]) for n in ours)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    freezer = attach_freezing(engine, ds_optimizer, total_steps=T)
    ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    ref_freezer = attach_freezing(reference, ref_optimizer, total_steps=T, release="never")
    initial, history = gathered_b(model, deepspeed), []  # B whole at the start and after each step
    for step in range(T):
        batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(100 * step + r))
                   for r in range(dist.get_world_size())]
        loss = engine(input_ids=batches[rank], labels=batches[rank]).loss
        engine.backward(loss)
        engine.step()
        history.append(gathered_b(model, deepspeed))
        both = torch.cat(batches)
        reference(input_ids=both, labels=both).loss.backward()
        ref_optimizer.step(), ref_optimizer.zero_grad()
    master = {n: full_master_value(m.lamda_B["default"]) for n, m in ours.items()}
    # Each column j of B must hold, from the step it froze on, its value after that step: working and master copy.
    frozen_exact, moved_before_freezing = True, True
    for n, r in ranks.items():
        for j in range(r):
            froze = next(t for t in range(T) if (r * (t + 1) * 2) // T > j)  # k(t+1) = floor(r (t+1) / (0.5 T))
            kept = history[froze][n][:, j]
            frozen_exact &= all(torch.equal(h[n][:, j], kept) for h in history[froze:])
            frozen_exact &= torch.equal(master[n][:, j], kept)
            moved_before_freezing &= not torch.equal(initial[n][:, j], kept)  # it trained until it froze
    final = history[-1]
    ref_final = {n: m.lamda_B["default"].detach() for n, m in theirs.items()}
    b_matches_reference = max(float((final[n] - ref_final[n]).abs().max()) for n in final)
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
                          "ranks": sorted(set(ranks.values())), "ranks_equal": all(torch.equal(gathered[0], v)
                                                                                   for v in gathered[1:]),
                          "freezer": freezer.state(), "ref_freezer": ref_freezer.state(),
                          "frozen_exact": frozen_exact, "moved_before_freezing": moved_before_freezing,
                          "b_max_abs_diff_to_reference": b_matches_reference}), flush=True)
    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # gloo's teardown now and then hangs (pytorch#75097); the work is done and checked


def main_trainer(out: Path) -> None:
    """The user's path: the transformers Trainer with a ZeRO-3 config and LamdaCallback, saved by save_model."""
    import deepspeed
    import torch.distributed as dist

    skip_shm_build()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lamda_peft import LamdaCallback, LamdaConfig

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True}
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=2, max_steps=T, learning_rate=1e-2,
                             deepspeed=ds_config, report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo")
    rank = dist.get_rank()
    checkpoint = out / "base"
    if rank == 0:
        make_tiny_llama(seed=0).save_pretrained(checkpoint)
    dist.barrier()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LamdaConfig(r=4, lora_alpha=8, target_modules="all-linear", freeze_ratio=0.5))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 128, (9,), generator=g)), "labels": ids} for _ in range(4 * T)]
    history = []

    class RecordB(TrainerCallback):  # B whole after every step (a collective: every rank runs the callbacks)
        def on_step_end(self, args, state, control, **kwargs):
            history.append(gathered_b(model, deepspeed))

    lamda = LamdaCallback()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lamda, RecordB()])
    initial = gathered_b(model, deepspeed)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    frozen_exact = moved_before_freezing = True
    for n, final in history[-1].items():
        for j in range(final.shape[1]):
            froze = next(t for t in range(T) if (4 * (t + 1) * 2) // T > j)
            frozen_exact &= all(torch.equal(h[n][:, j], history[froze][n][:, j]) for h in history[froze:])
            moved_before_freezing &= not torch.equal(initial[n][:, j], history[froze][n][:, j])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    trainer.model_wrapped.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=ids).logits
    if rank == 0:
        torch.save({"ids": ids, "logits": logits}, out / "logits.pt")
        print(json.dumps({"stage": 3, "freezer": lamda.freezer.state(), "frozen_exact": frozen_exact,
                          "moved_before_freezing": moved_before_freezing}), flush=True)
    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if sys.argv[1] == "zero3-trainer":
        main_trainer(Path(sys.argv[2]))
    else:
        main(sys.argv[1], Path(sys.argv[2]))
