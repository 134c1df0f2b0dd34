"""The gradient init's cost on SmolLM2 at issue 24's target shape: 8 batches of 4 x 256 tokens.

    python benchmarks/gradient_init_cost.py          # writes docs/results/gradient_init_cost.{json,md}

Every variant runs in a fresh process (one torch thread unless OMP_NUM_THREADS says otherwise) on the same 32 GSM8K
question-answer pairs, 4 per batch, each padded or cut to 256 tokens (the loss on every real token), LaMDA r = 16 on
all 210 linear modules:

    spectral            get_peft_model(LamdaConfig(init="spectral")): the paper's init, one SVD per module
    gradient q=1, p=8   get_peft_model(LamdaConfig(init="gradient")) then lamda_peft.initialize (the defaults:
                        4 passes over the batches)
    gradient q=0, p=8   the same with power_iterations=0 (2 passes)
    lora-ga             PEFT's LoRA-GA (preprocess_loraga, then get_peft_model): each weight's full gradient
                        accumulated by autograd in one pass, then one SVD per module; the full-gradient reference
    forward+backward    the batches' loss backward with no parameter gradient (the input embeddings require one): the
                        activations any calibration holds
    lora training pass  LoRA r = 16 (all-linear) and the batches' loss backward, gradients accumulated: what one pass
                        of LoRA training on the same batches holds (each adapted layer keeps its input for backward)

Time: wall seconds of the whole init (get_peft_model included). Memory: the peak of the C heap in use during the init
above its value with the model loaded (PeakHeap, gradient_init_memory.py); "extra" subtracts the forward+backward
floor, leaving what the calibration itself adds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_init_memory import RESULTS, PeakHeap, batches, load_smollm2  # noqa: E402

R, BATCHES, BATCH_SIZE, LENGTH = 16, 8, 4, 256
VARIANTS = ("spectral", "gradient q=1, p=8", "gradient q=0, p=8", "lora-ga", "forward+backward", "lora training pass")


def run(variant: str, out: Path) -> None:
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    import lamda_peft
    from lamda_peft import LamdaConfig

    model, tokenizer = load_smollm2()
    data = batches(tokenizer, BATCHES, BATCH_SIZE, LENGTH, padding="max_length")
    common = dict(r=R, lora_alpha=2 * R, target_modules="all-linear", task_type="CAUSAL_LM")
    began = time.perf_counter()
    with PeakHeap() as memory:
        if variant == "spectral":
            get_peft_model(model, LamdaConfig(**common))
        elif variant.startswith("gradient"):
            peft_model = get_peft_model(model, LamdaConfig(**common, init="gradient"))
            lamda_peft.initialize(peft_model, data, num_batches=BATCHES, show_progress_bar=False,
                                  power_iterations=int(variant.split("q=")[1][0]))
        elif variant == "lora-ga":
            config = _maybe_include_all_linear_layers(LoraConfig(**common, init_lora_weights="lora_ga",
                                                                 lora_ga_config=LoraGAConfig()), model)

            def train_step() -> None:
                for batch in data:
                    model(**batch).loss.backward()

            preprocess_loraga(model, config, train_step)
            get_peft_model(model, config)
        elif variant == "lora training pass":
            peft_model = get_peft_model(model, LoraConfig(**common))
            for batch in data:
                peft_model(**batch).loss.backward()
        else:
            for param in model.parameters():
                param.requires_grad_(False)
            embed = model.get_input_embeddings()
            for batch in data:
                inputs = embed(batch["input_ids"]).requires_grad_(True)
                model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    torch.save({"peak_growth": memory.growth, "seconds": time.perf_counter() - began}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (the table shows the fastest)")
    parser.add_argument("--output", default=str(RESULTS / "gradient_init_cost"))
    args = parser.parse_args()
    if args.variant:
        run(args.variant, Path(args.out))
        return
    found: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in args.variants:
                target = Path(tmp) / f"{repeat}-{args.variants.index(variant)}.pt"
                subprocess.run([sys.executable, __file__, "--variant", variant, "--out", str(target)], check=True)
                found.setdefault(variant, []).append(torch.load(target))
                print(variant, found[variant][-1], flush=True)
    seconds = {v: min(r["seconds"] for r in runs) for v, runs in found.items()}
    peak = {v: max(r["peak_growth"] for r in runs) / 2**20 for v, runs in found.items()}
    floor = peak.get("forward+backward", 0.0)
    result = {"command": "python " + shlex.join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__, "r": R,
              "shape": f"{BATCHES} batches of {BATCH_SIZE} x {LENGTH} tokens", "runs": found,
              "seconds_fastest": seconds, "peak_growth_mib": peak}
    Path(args.output + ".json").write_text(json.dumps(result, indent=1) + "\n")
    spectral, full = seconds.get("spectral"), peak.get("lora-ga")
    lines = ["# The gradient init's cost on SmolLM2 (issue 24 target shape)", "",
             f"SmolLM2-135M, r = {R} on all 210 linear modules, {BATCHES} batches of {BATCH_SIZE} x {LENGTH} tokens "
             f"(GSM8K); fastest of {args.repeats} fresh processes; memory: peak C heap in use above the loaded model.",
             "", "| variant | seconds | x spectral | peak growth (MiB) | extra over forward+backward (MiB) | "
             "extra, x LoRA-GA's |", "|---|---|---|---|---|---|"]
    for v in found:
        extra = peak[v] - floor
        ratio = f"{seconds[v] / spectral:.1f}" if spectral else "-"
        share = f"{extra / (full - floor):.2f}" if full and full > floor and v != "forward+backward" else "-"
        lines.append(f"| {v} | {seconds[v]:.1f} | {ratio} | {peak[v]:.0f} | {extra:.0f} | {share} |")
    lines += ["", f"Machine: {result['machine']}, OMP_NUM_THREADS={result['threads']}; torch {result['torch']}. "
              f"Command: `{result['command']}`.", ""]
    Path(args.output + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
