"""The gradient init on SmolLM2: peak memory of the calibration against a full-gradient reference, and how close the
sketched subspaces are to the float64 SVD of the full gradient (issue 24).

    python benchmarks/gradient_init_memory.py        # writes docs/results/gradient_init_memory.{json,md}

Every variant runs in a fresh process on the same 32 GSM8K question-answer pairs, one per batch (up to 128
tokens, the loss on every token), LaMDA r = 16 on all 210 linear modules:

    sketch q=Q, p=P   lamda_peft.initialize on LamdaConfig(init="gradient"): zero-valued sketch parameters,
                      randomized SVD with oversample P and Q power iterations (2Q + 2 passes over the batches)
    full              the LoRA-GA-style reference: each targeted weight's full gradient G (d_out x d_in, float32)
                      accumulated by autograd over the batches (1 pass), then a float64 SVD of each G

Memory: the bytes the C heap holds in use (glibc's mallinfo2: arena plus mmapped blocks, where PyTorch's CPU tensors
live), sampled every 5 ms; the peak during the calibration minus the value just before (the model loaded). Unlike
the resident set, it does not count memory freed but kept by the allocator. Exactness, per module, against the
float64 SVD of the full gradient: the energy of G the sketch's subspaces capture, ||U_s^T G V_s||_F^2, over the
best possible, sigma_1^2 + ... + sigma_16^2; and the largest principal angle between span(A^T) and G's top-16 right
singular vectors (ill-defined where sigma_16 ~ sigma_17, hence the energy).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
R, BATCHES, BATCH_SIZE, LENGTH = 16, 32, 1, 128
SKETCHES = {"sketch q=0, p=8": (0, 8), "sketch q=1, p=8 (default)": (1, 8), "sketch q=2, p=16": (2, 16)}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """The peak of the bytes in use on the C heap (mallinfo2's uordblks + hblkhd) while the block runs, above its
    value at the start."""

    def __enter__(self) -> "PeakHeap":
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2
        self.start = self.peak = self._in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._in_use())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._in_use())
        self.growth = self.peak - self.start


def load_smollm2():
    """(model in eval mode, float32; its tokenizer with a pad token), seeded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_peft.apps.models import smollm2_path

    torch.manual_seed(0)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def batches(tokenizer, count: int = BATCHES, size: int = BATCH_SIZE, length: int = LENGTH,
            padding: bool | str = True) -> list[dict]:
    """``count`` batches of ``size`` GSM8K question-answer pairs, up to ``length`` tokens (``padding="max_length"``:
    exactly), the loss on every real token."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: count * size]]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=padding, truncation=True, max_length=length,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def run(variant: str, out: Path, sketch_factors: Path | None) -> None:
    from peft import get_peft_model

    import lamda_peft
    from lamda_peft import LamdaConfig, LamdaLayer

    model, tokenizer = load_smollm2()
    data = batches(tokenizer)
    result: dict = {}
    if variant in SKETCHES:
        power_iterations, oversample = SKETCHES[variant]
        model = get_peft_model(model, LamdaConfig(r=R, lora_alpha=2 * R, target_modules="all-linear",
                                                  init="gradient", task_type="CAUSAL_LM"))
        began = time.perf_counter()
        with PeakHeap() as memory:
            lamda_peft.initialize(model, data, num_batches=BATCHES, power_iterations=power_iterations,
                                  oversample=oversample, show_progress_bar=False)
        result["factors"] = {name.removeprefix("base_model.model."): (m.lamda_A["default"].clone(),
                                                                      m.lamda_B0S0["default"].clone())
                             for name, m in model.named_modules() if isinstance(m, LamdaLayer)}
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        for param in model.parameters():
            param.requires_grad_(False)
        weights = {n: model.get_submodule(n).weight for n in names}
        sketches = torch.load(sketch_factors)
        began = time.perf_counter()
        with PeakHeap() as memory:
            for weight in weights.values():
                weight.requires_grad_(True)
            for batch in data:
                model(**batch).loss.backward()
            exact = {}
            for name, weight in weights.items():
                exact[name] = torch.linalg.svd(weight.grad.double(), full_matrices=False)
        result["comparison"] = {label: compare(weights, exact, found["factors"]) for label, found in sketches.items()}
    result.update(peak_growth=memory.growth, seconds=time.perf_counter() - began)
    torch.save(result, out)


def compare(weights: dict, exact: dict, factors: dict) -> dict[str, list[float]]:
    """Per module: the fraction of G's best top-r energy that span(B0) x span(A^T) captures, and the angles."""
    energy, angles = [], []
    for name, weight in weights.items():
        U, S, Vh = exact[name]
        A, B0 = factors[name]
        Us, Vs = torch.linalg.qr(B0.double()).Q, torch.linalg.qr(A.double().T).Q
        captured = float((Us.T @ weight.grad.double() @ Vs).square().sum())
        energy.append(captured / float(S[:R].square().sum()))
        angles.append(angle(A.T, Vh[:R].T))
    return {"energy": energy, "angle": angles}


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return math.degrees(float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0).min())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--sketches", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "gradient_init_memory"))
    args = parser.parse_args()
    if args.variant:
        run(args.variant, Path(args.out), Path(args.sketches) if args.sketches else None)
        return
    import subprocess

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in SKETCHES:
            target = Path(tmp) / f"{len(found)}.pt"
            subprocess.run([sys.executable, __file__, "--variant", variant, "--out", str(target)], check=True)
            found[variant] = torch.load(target)
        torch.save({label: {"factors": found[label]["factors"]} for label in SKETCHES}, Path(tmp) / "sketches.pt")
        target = Path(tmp) / "full.pt"
        subprocess.run([sys.executable, __file__, "--variant", "full", "--out", str(target),
                        "--sketches", str(Path(tmp) / "sketches.pt")], check=True)
        found["full"] = torch.load(target)

    def quantiles(values: list[float]) -> dict:
        values = sorted(values)
        return {"min": values[0], "p10": values[int(0.1 * len(values))], "median": values[len(values) // 2],
                "p90": values[int(0.9 * len(values))], "max": values[-1]}

    comparison = found["full"]["comparison"]
    result = {"command": "python " + shlex.join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "modules": len(comparison[next(iter(SKETCHES))]["energy"]), "r": R,
              "peak_growth_bytes": {v: found[v]["peak_growth"] for v in found},
              "seconds": {v: round(found[v]["seconds"], 1) for v in found},
              "energy_captured": {v: quantiles(c["energy"]) for v, c in comparison.items()},
              "angle_A_degrees": {v: quantiles(c["angle"]) for v, c in comparison.items()}}
    Path(args.output + ".json").write_text(json.dumps(result, indent=1) + "\n")
    mib = {v: b / 2**20 for v, b in result["peak_growth_bytes"].items()}
    lines = ["# The gradient init on SmolLM2: memory and exactness (issue 24)", "",
             f"SmolLM2-135M, LaMDA r = {R} on all {result['modules']} linear modules, {BATCHES * BATCH_SIZE} GSM8K "
             f"question-answer pairs ({BATCHES} batches of {BATCH_SIZE}, up to {LENGTH} tokens). Peak heap in use "
             "during the calibration, above the loaded model:", "",
             "| variant | peak growth (MiB) | seconds |", "|---|---|---|"]
    for variant in found:
        lines.append(f"| {variant} | {mib[variant]:.0f} | {result['seconds'][variant]} |")
    lines += ["", "Against the float64 SVD of the full gradient, per module: the fraction of the best top-16 energy of G "
              "that the sketch's subspaces capture, and the largest principal angle of A's row space (degrees):", "",
              "| variant | energy: min | p10 | median | angle: median | p90 | max |", "|---|---|---|---|---|---|---|"]
    for variant in SKETCHES:
        e, a = result["energy_captured"][variant], result["angle_A_degrees"][variant]
        lines.append(f"| {variant} | {e['min']:.3f} | {e['p10']:.3f} | {e['median']:.3f} | {a['median']:.1f} | "
                     f"{a['p90']:.1f} | {a['max']:.1f} |")
    lines += ["", f"Machine: {result['machine']}; torch {result['torch']}. Command: `{result['command']}`.", ""]
    Path(args.output + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
