"""Memory and speed of every method side by side, on the same batches (issue 6).

    python benchmarks/memory_speed.py --configs smol-fp32-256 smol-bf16-256 smol-bf16-1024 minilm --rounds 3

Per configuration and method: accounted training memory (lamda_peft.memory.measure_training_step: bytes saved for
backward counted once per storage, parameters, buffers, gradients, AdamW state), saved bytes over the floor (the
frozen model backpropagating to its input embeddings), adapter init time, and the step time as the median over
rounds of the per-round ratio to PEFT LoRA (methods interleaved step by step, so the machine's drift cancels).
Writes docs/results/memory_speed.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import lamda_peft
from lamda_peft import LamdaConfig, LoraFAConfig
from lamda_peft.apps.models import minilm_path, smollm2_path
from lamda_peft.memory import MB, measure_training_step
from lamda_peft.memory_options import chunked_causal_lm_loss, enable_layer_checkpointing

CONFIGS = {  # name: (model, dtype, batch, seq, r, timed-rounds factor)
    "smol-fp32-256": ("smollm2", torch.float32, 4, 256, 16, 1.0),
    "smol-bf16-256": ("smollm2", torch.bfloat16, 4, 256, 16, 1.0),
    "smol-bf16-1024": ("smollm2", torch.bfloat16, 4, 1024, 16, 0.5),
    "minilm": ("minilm", torch.float32, 16, 128, 8, 1.0),
}
METHODS = ("floor", "peft_lora", "peft_lorafa_optimizer", "peft_pissa", "lorafa", "lamda", "lamda_b_frozen",
           "lamda_plus_plus", "lamda_b_frozen_chunked_ce", "lamda_b_frozen_options")
OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def load_base(model: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if model == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype).train(), "CAUSAL_LM"
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, dtype=dtype).train(), "SEQ_CLS"


def build(method: str, model: str, dtype: torch.dtype, r: int, fast_init: bool = False):
    """(model, optimizer or None, loss_fn, init seconds) for one method."""
    base, task = load_base(model, dtype)
    common = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type=task)
    default_loss = lambda m, b: m(**b).loss  # noqa: E731
    start = time.perf_counter()
    if method == "floor":
        base.requires_grad_(False)

        def floor_loss(m, b):
            embeds = m.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
            return m(inputs_embeds=embeds, labels=b["labels"]).loss
        return base, None, floor_loss, 0.0
    if method in ("peft_lora", "peft_lorafa_optimizer", "peft_pissa"):
        init = ("pissa_niter_4" if fast_init else "pissa") if method == "peft_pissa" else True
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=init, **common))
        init_s = time.perf_counter() - start
        optimizer = None
        if method == "peft_lorafa_optimizer":
            from peft.optimizers import create_lorafa_optimizer

            optimizer = create_lorafa_optimizer(peft_model, r=r, lora_alpha=2 * r, lr=1e-4)
        return peft_model, optimizer, default_loss, init_s
    if method == "lorafa":
        peft_model = get_peft_model(base, LoraFAConfig(**common))
    else:
        extra = {"rank_allocation": "energy"} if method == "lamda_plus_plus" else {}
        if fast_init:  # memory does not depend on the init; seeded randomized SVD, 4 power iterations
            extra["svd_method"] = "randomized"
        peft_model = get_peft_model(base, LamdaConfig(**common, **extra))
    init_s = time.perf_counter() - start
    loss_fn = default_loss
    if method.startswith("lamda_b_frozen"):
        # B completely frozen and released (single process): no gradient, no AdamW state, no dB computation
        for module in peft_model.modules():
            if hasattr(module, "lamda_B"):
                for p in module.lamda_B.values():
                    p.requires_grad_(False)
    if method in ("lamda_b_frozen_chunked_ce", "lamda_b_frozen_options"):
        if task != "CAUSAL_LM":
            return None
        if method == "lamda_b_frozen_options":  # both options: chunked CE + layer checkpointing
            enable_layer_checkpointing(peft_model)
        loss_fn = lambda m, b: chunked_causal_lm_loss(m, b["input_ids"], b["labels"], chunk_size=1024)  # noqa: E731
    return peft_model, None, loss_fn, init_s


def batch_for(model: str, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (batch, seq), generator=g)
    labels = ids if model == "smollm2" else torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "labels": labels}


def timed_step(model, optimizer, loss_fn, batch) -> float:
    start = time.perf_counter()
    loss_fn(model, batch).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None
    return time.perf_counter() - start


def run_config(name: str, rounds: int, methods: tuple[str, ...], fast_init: bool = False) -> dict:
    model_name, dtype, batch, seq, r, factor = CONFIGS[name]
    data = batch_for(model_name, batch, seq)
    built, results = {}, {}
    for method in methods:
        out = build(method, model_name, dtype, r, fast_init)
        if out is None:
            continue
        model, optimizer, loss_fn, init_s = out
        opt = optimizer
        report = measure_training_step(model, data, loss_fn=loss_fn, optimizer=opt)
        if opt is None and any(p.requires_grad for p in model.parameters()):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        built[method] = (model, opt, loss_fn)
        results[method] = {"init_s": init_s, **report.as_dict()}
        print(f"[{name}] {method}: saved {report.saved_bytes / MB:.1f} MB, accounted {report.accounted_bytes / MB:.1f} MB, "
              f"init {init_s:.1f} s", flush=True)
    floor = results["floor"]
    for res in results.values():
        res["saved_over_floor"] = res["saved_bytes"] - floor["saved_bytes"]
        res["accounted_over_floor"] = res["accounted_bytes"] - floor["accounted_bytes"]
    n_rounds = max(1, round(rounds * factor)) if rounds > 0 else 0
    if n_rounds == 0:  # memory only
        return {"config": {"model": model_name, "dtype": str(dtype), "batch": batch, "seq": seq, "r": r,
                           "rounds": 0}, "methods": results}
    per_round: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(1):  # warm-up step for each method
        for method, (model, opt, loss_fn) in built.items():
            timed_step(model, opt, loss_fn, data)
    for i in range(n_rounds):
        for method, (model, opt, loss_fn) in built.items():
            per_round[method].append(timed_step(model, opt, loss_fn, data))
        print(f"[{name}] round {i + 1}/{n_rounds}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in per_round.items()),
              flush=True)
    for method, times in per_round.items():
        ratios = [t / lora for t, lora in zip(times, per_round["peft_lora"])]
        results[method]["step_s_median"] = statistics.median(times)
        results[method]["step_vs_lora"] = statistics.median(ratios)
        results[method]["step_ratios"] = ratios
    return {"config": {"model": model_name, "dtype": str(dtype), "batch": batch, "seq": seq, "r": r,
                       "rounds": n_rounds}, "methods": results}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    import peft
    import transformers

    return {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "lamda_peft": lamda_peft.__version__
            if hasattr(lamda_peft, "__version__") else "dev", "cuda": torch.cuda.is_available()}


def write(results: dict, command: str, stem: str = "memory_speed") -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# Memory and speed, side by side", "",
             f"Command: `{command}`  ", f"Machine: {results['machine']}  ", "MB = 10^6 bytes. Step time: median over "
             "rounds of the per-round ratio to PEFT LoRA (methods interleaved step by step).", ""]
    for name, res in results["configs"].items():
        c = res["config"]
        lines += [f"## {name}: {c['model']}, {c['dtype']}, {c['batch']}x{c['seq']}, r={c['r']}, {c['rounds']} timed rounds",
                  "", "| method | saved for backward MB | over the floor MB | accounted MB | accounted over floor MB "
                  "| trainable params | step vs LoRA | init s |", "|---|---|---|---|---|---|---|---|"]
        for method, m in res["methods"].items():
            lines.append(f"| {method} | {m['saved_bytes'] / MB:.1f} | {m['saved_over_floor'] / MB:+.1f} "
                         f"| {m['accounted_bytes'] / MB:.1f} | {m['accounted_over_floor'] / MB:+.1f} "
                         f"| {m['trainable_parameters']:,} | {m.get('step_vs_lora', float('nan')):.2f} "
                         f"| {m['init_s']:.1f} |")
        lines.append("")
    (OUT / f"{stem}.md").write_text("\n".join(lines))
    plot(results, stem)


def plot(results: dict, stem: str = "memory_speed") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], configs.items()):
        methods = list(res["methods"])
        ax.barh(methods, [res["methods"][m]["accounted_bytes"] / MB for m in methods], color="tab:blue")
        ax.set_title(name)
        ax.set_xlabel("accounted training memory (MB)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(OUT / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (halved for the 4x1024 case); 0: memory only")
    parser.add_argument("--fast-init", action="store_true",
                        help="randomized SVD for PiSSA and LaMDA (memory figures are unchanged; init times are not)")
    parser.add_argument("--output", default="memory_speed",
                        help="result files: docs/results/<output>.{md,json,png} (overwritten)")
    args = parser.parse_args()
    if "floor" not in args.methods or "peft_lora" not in args.methods:
        parser.error("--methods must include floor and peft_lora (the references)")
    torch.manual_seed(0)
    command = "python benchmarks/memory_speed.py " + " ".join(sys.argv[1:])
    results = {"machine": machine(), "command": command, "configs": {}}
    for name in args.configs:
        results["configs"][name] = run_config(name, args.rounds, tuple(args.methods), args.fast_init)
        write(results, command, args.output)  # after each configuration, so a long run leaves partial results


if __name__ == "__main__":
    main()
