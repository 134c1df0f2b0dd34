"""Cost of LaMDA++ (allocation + spectral init) against PEFT's PiSSA init, side by side in one run (issue 4).

Each variant times ``get_peft_model`` on a freshly loaded SmolLM2-135M (all 210 linear modules, float32, CPU):

    lamda++ exact        LamdaConfig(r, rank_allocation="energy"): one exact SVD per module (top 2r kept),
                         greedy allocation, spectral init from the same SVD truncated to each module's rank
    pissa exact          LoraConfig(r, init_lora_weights="pissa"): one exact SVD per module
    lamda uniform exact  LamdaConfig(r): plain LaMDA at the same uniform rank (what the allocation adds)
    lamda++ randomized   svd_method="randomized" (seeded, 4 power iterations, top 2r)
    pissa_niter_4        LoraConfig(r, init_lora_weights="pissa_niter_4")

Variants run interleaved (round-robin) ``--repeats`` times; the table reports the median and the ratio to PiSSA
exact, since the CPU may be shared and absolute times are noisy. The accuracy of the randomized decomposition is
measured against the exact one on the same modules: the ranks it allocates, and for modules with equal ranks the
relative error of the top-r part ``s B0 A`` and the largest principal angle between the two top-r subspaces.

    python benchmarks/allocation_vs_pissa.py [--r 16] [--repeats 1]
    python benchmarks/allocation_vs_pissa.py --variants "lamda++ exact,pissa exact" --repeats 2 \
        --output docs/results/allocation_vs_pissa_exact      # the exact pair alone, order reversed every round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

import lamda_peft
from lamda_peft import LamdaConfig, LamdaLayer
from lamda_peft.allocation import lamda_parameter_counts
from lamda_peft.apps.models import smollm2_path
from lamda_peft.tuners.delta import weight_as_out_in

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def configs(r: int) -> dict:
    common = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    return {
        "lamda++ exact": LamdaConfig(**common, rank_allocation="energy"),
        "pissa exact": LoraConfig(**common, init_lora_weights="pissa"),
        "lamda uniform exact": LamdaConfig(**common),
        "lamda++ randomized": LamdaConfig(**common, rank_allocation="energy", svd_method="randomized"),
        "pissa_niter_4": LoraConfig(**common, init_lora_weights="pissa_niter_4"),
    }


def timed_injection(path: str, config) -> tuple[float, torch.nn.Module]:
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # loading is not timed
    start = time.perf_counter()
    model = get_peft_model(base, config)
    return time.perf_counter() - start, model


def top_parts(model) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """{module: (r, A, s B0S0)}: the top-r part of each weight is (s B0S0) @ A, its row space is spanned by A."""
    return {
        name: (layer.r["default"], layer.lamda_A["default"].float(), layer.scaling["default"] * layer.lamda_B0S0["default"])
        for name, layer in model.named_modules() if isinstance(layer, LamdaLayer)
    }


def float64_reference(model) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """The same structure as ``top_parts``, from a float64 ``torch.linalg.svd`` of each (untouched) base weight."""
    parts = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LamdaLayer):
            r = layer.r["default"]
            U, S, Vh = torch.linalg.svd(weight_as_out_in(layer.get_base_layer()).double(), full_matrices=False)
            parts[name] = (r, Vh[:r], U[:, :r] * S[:r])
    return parts


def decomposition_accuracy(exact: dict, randomized: dict) -> dict:
    """How far the top-r parts of ``randomized`` are from those of ``exact`` (modules with the same rank)."""
    same = [n for n in exact if exact[n][0] == randomized[n][0]]
    rel_errors, angles, captured = [], [], []
    for name in same:
        _, a_e, b_e = exact[name]
        _, a_r, b_r = randomized[name]
        top_e, top_r = b_e.double() @ a_e.double(), b_r.double() @ a_r.double()
        rel_errors.append(float(torch.linalg.matrix_norm(top_r - top_e) / torch.linalg.matrix_norm(top_e)))
        # energy the randomized rank-r part captures, relative to the optimum (the exact top-r part): 1 is exact
        captured.append(float(torch.linalg.matrix_norm(top_r) ** 2 / torch.linalg.matrix_norm(top_e) ** 2))
        # principal angles between the row spaces (right singular subspaces) of the two top-r parts
        q_e, q_r = torch.linalg.qr(a_e.double().T)[0], torch.linalg.qr(a_r.double().T)[0]
        cosines = torch.linalg.svdvals(q_e.T @ q_r).clamp(max=1.0)
        angles.append(math.degrees(float(torch.arccos(cosines.min()))))
    return {
        "modules": len(exact),
        "modules_with_equal_rank": len(same),
        "rank_differences_sum_abs": sum(abs(exact[n][0] - randomized[n][0]) for n in exact),
        "top_r_relative_error_median": statistics.median(rel_errors),
        "top_r_relative_error_max": max(rel_errors),
        "largest_principal_angle_deg_median": statistics.median(angles),
        "largest_principal_angle_deg_max": max(angles),
        "captured_energy_ratio_median": statistics.median(captured),
        "captured_energy_ratio_min": min(captured),
    }


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "lamda_peft": lamda_peft.__version__}


def accuracy_lines(acc: dict | None, title: str) -> list[str]:
    if acc is None:
        return []
    return [
        "",
        f"## {title}",
        "",
        f"- modules allocated the same rank: {acc['modules_with_equal_rank']} of {acc['modules']} "
        f"(sum of |rank differences|: {acc['rank_differences_sum_abs']}; near-ties can break differently, method.md 3.3)",
        f"- relative Frobenius error of the top-r part s B0 A: median {acc['top_r_relative_error_median']:.2e}, "
        f"max {acc['top_r_relative_error_max']:.2e}",
        f"- largest principal angle between the top-r subspaces: median "
        f"{acc['largest_principal_angle_deg_median']:.3f} deg, max {acc['largest_principal_angle_deg_max']:.3f} deg",
        f"- energy of the top-r part over the reference's top-r energy (1 = optimal): median "
        f"{acc['captured_energy_ratio_median']:.4f}, min {acc['captured_energy_ratio_min']:.4f}",
    ]


def write_markdown(result: dict, path: Path) -> None:
    r = result["r"]
    lines = [
        "# LaMDA++ allocation + spectral init vs PEFT PiSSA init (SmolLM2-135M, CPU)",
        "",
        f"`get_peft_model` on SmolLM2-135M-Instruct, all {result['modules']} linear modules, uniform rank r={r} "
        f"(LaMDA++: same total rank, ranks in [{r // 2}, {2 * r}], so it keeps the top {2 * r} singular triplets). "
        f"Median of {result['repeats']} interleaved run(s); model loading not timed.",
        "",
        "| variant | seconds (median) | runs | ratio to PiSSA exact |",
        "|---|---|---|---|",
    ]
    base = statistics.median(result["times"]["pissa exact"])
    for name, times in result["times"].items():
        median = statistics.median(times)
        lines.append(f"| {name} | {median:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {median / base:.2f} |")
    for key, title in (("exact_vs_float64", "Our exact decomposition (float32 Gram eigh) vs a float64 SVD (LaMDA++ "
                                          "ranks)"), ("randomized_vs_exact", "Randomized vs exact decomposition (LaMDA++)")):
        lines += accuracy_lines(result.get(key), title)
    if "parameters" in result:
        lines += [
            "",
            "## Trainable parameters (LaMDA, per-module ranks)",
            "",
            "| allocation | while B trains (sum r^2 + r d_out) | after B is frozen (sum r^2) |",
            "|---|---|---|",
        ]
    for name, counts in result.get("parameters", {}).items():
        lines.append(f"| {name} | {counts['while_b_trains']:,} | {counts['after_b_frozen']:,} |")
    m = result["machine"]
    lines += [
        "",
        "## Setup",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; load average at start / end "
        f"{result['load_average'][0]} / {result['load_average'][1]} (the CPU was shared with other jobs: absolute "
        "times are noisy, compare the ratios)",
        f"- versions: python {m['python']}, torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}, "
        f"lamda_peft {m['lamda_peft']}",
        f"- command: `{result['command']}`",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--output", type=Path, default=RESULTS / "allocation_vs_pissa")
    args = parser.parse_args(argv)
    names = args.variants.split(",") if args.variants else list(configs(args.r))
    path = smollm2_path()
    load_start = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in names}
    kept: dict[str, torch.nn.Module] = {}
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # ABBA: a drifting load biases no variant
        for name in order:
            config = configs(args.r)[name]  # a fresh config each run: nothing carried over
            seconds, model = timed_injection(path, config)
            times[name].append(seconds)
            modules = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
            print(f"[{repeat + 1}/{args.repeats}] {name}: {seconds:.1f} s", flush=True)
            if repeat == 0 and name in ("lamda++ exact", "lamda++ randomized", "lamda uniform exact"):
                kept[name] = model
    result = {
        "r": args.r,
        "repeats": args.repeats,
        "modules": modules,
        "times": times,
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "machine": machine(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
    }
    if {"lamda++ exact", "lamda++ randomized"} <= kept.keys():
        result["randomized_vs_exact"] = decomposition_accuracy(
            top_parts(kept["lamda++ exact"]), top_parts(kept["lamda++ randomized"]))
    if "lamda++ exact" in kept:  # our exact path (float32 Gram eigh) against a float64 SVD of the same weights
        result["exact_vs_float64"] = decomposition_accuracy(
            float64_reference(kept["lamda++ exact"]), top_parts(kept["lamda++ exact"]))
    if {"lamda++ exact", "lamda uniform exact"} <= kept.keys():
        result["parameters"] = {
            name: {k: v for k, v in vars(lamda_parameter_counts(kept[key])).items() if k != "ranks"}
            for name, key in ((f"uniform r={args.r}", "lamda uniform exact"), ("LaMDA++ (exact)", "lamda++ exact"))
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.output.with_suffix(".md"))
    print(args.output.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
