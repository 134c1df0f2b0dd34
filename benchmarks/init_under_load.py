"""Time of the spectral init (``get_peft_model``) on an idle and on a loaded CPU, by eigensolver.

    python benchmarks/init_under_load.py            # writes docs/results/init_under_load.{json,md}

Variants, in one process, interleaved:
    now      the shipped path: the top-r eigenpairs of each Gram matrix from LAPACK's subset solver, every
             decomposition on one thread, several weights at once (lamda_peft.eigensolver)
    before   the path before issue 13: the full ``torch.linalg.eigh`` of each Gram matrix with PyTorch's default
             threads, one weight after the other (reproduced here by swapping the solver back in)
    torch    the path of a core install without SciPy's wheel (issue 25): the full ``torch.linalg.eigh`` of each
             Gram matrix, every decomposition on one thread, several weights at once

    python benchmarks/init_under_load.py --variants now torch --output docs/results/init_without_scipy

Conditions:
    idle     nothing else runs (pause other jobs first: this script checks the load average and reports it)
    loaded   another process keeps every core busy (a PyTorch matmul loop on all threads), as when a user
             starts a second job on a laptop

Cases: MiniLM, LaMDA r=8 on all 37 linear modules; SmolLM2-135M, LaMDA++ r=16 (allocation and init) on all 210.
A run that exceeds ``--limit`` seconds is stopped and reported as "> limit" (the "before" path under load can take
minutes per model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _busy_loop(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    while True:
        a = (a @ a).tanh_()


def _previous_solver():
    """The pre-issue-13 decomposition: full eigh, default threads, sequential (swapped into lamda_peft)."""
    import torch
    from lamda_peft import eigensolver

    def full_eigh(gram, r):
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(0)[:r], vectors.flip(1)[:, :r]

    return [(eigensolver, "top_eigenpairs", full_eigh), (eigensolver, "single_threaded", contextlib.nullcontext),
            (eigensolver, "decomposition_workers", lambda: 1)]


def _time_case(case: str, variant: str, queue) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import lamda_peft  # noqa: F401
    from lamda_peft import LamdaConfig
    from lamda_peft import spectral
    from lamda_peft.apps.models import minilm_path, smollm2_path

    if variant == "before":
        for module, name, value in _previous_solver():
            setattr(module, name, value)
        spectral.single_threaded = contextlib.nullcontext
    elif variant == "torch":  # as if SciPy's wheel were absent: no bundled OpenBLAS, PyTorch's eigh
        from lamda_peft import eigensolver

        eigensolver._bundled_openblas = lambda: None
        eigensolver._lapacke_syevr = lambda: None
    if case == "minilm lamda":
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        config = LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS")
    else:
        base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        config = LamdaConfig(r=16, lora_alpha=32, target_modules="all-linear", rank_allocation="energy")
    start = time.perf_counter()
    get_peft_model(base, config)
    queue.put(time.perf_counter() - start)


def measure(case: str, variant: str, limit: float) -> float | None:
    """Seconds of get_peft_model in a fresh process (so thread pools start clean), None past ``limit``."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_time_case, args=(case, variant, queue))
    proc.start()
    proc.join(limit + 60)  # loading the model is not timed
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return queue.get() if not queue.empty() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=float, default=240.0, help="seconds before a run is stopped")
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"])
    parser.add_argument("--variants", nargs="+", default=["now", "before"], choices=["now", "before", "torch"],
                        help="solvers to compare; the first is the reference of the ratio column")
    parser.add_argument("--output", default=str(RESULTS / "init_under_load"))
    args = parser.parse_args()
    cases = ["minilm lamda", "smollm2 lamda++"]
    rows = []
    for condition in args.conditions:
        load = None
        if condition == "loaded":
            load = mp.get_context("spawn").Process(target=_busy_loop, args=(os.cpu_count() or 2,), daemon=True)
            load.start()
            time.sleep(3)
        load_before = os.getloadavg()[0]
        for case in cases:
            for variant in args.variants:
                times = []
                for _ in range(args.repeats):
                    seconds = measure(case, variant, args.limit)
                    times.append(seconds)
                    print(f"{condition:7s} {case:16s} {variant:7s} {seconds if seconds is not None else '> limit'}",
                          flush=True)
                    if seconds is None:
                        break  # no second try of a run that already hit the limit
                rows.append(dict(condition=condition, case=case, variant=variant, seconds=times,
                                 load_average=[load_before, os.getloadavg()[0]]))
        if load is not None:
            load.kill()
            load.join()
    import torch

    meta = dict(command="python " + shlex.join(sys.argv), machine=f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores", torch=torch.__version__, threads=torch.get_num_threads(), limit=args.limit)
    Path(args.output + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    Path(args.output + ".md").write_text(render(meta, rows))  # docs/results/init_under_load.md merges the runs
    print(render(meta, rows))


def _best(times: list) -> str:
    done = [t for t in times if t is not None]
    return f"{min(done):.2f}" if done and len(done) == len(times) else "> limit"


def render(meta: dict, rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    reference, others = variants[0], variants[1:]
    lines = ["# Spectral init on an idle and on a loaded CPU", "",
             "`get_peft_model` time in seconds (best of the repeats; model loading not timed), each run in a fresh "
             "process. *now*: LAPACK's subset solver for the top r (SciPy's bundled OpenBLAS), one thread per "
             "decomposition, several weights at once; *torch*: the same with PyTorch's full `eigh` (a core install "
             "without SciPy); *before*: full `torch.linalg.eigh` with PyTorch's default threads, one weight after "
             "the other.", "",
             "| condition | case | " + " | ".join(f"{v} (s)" for v in variants) + " | "
             + " | ".join(f"{v} / {reference}" for v in others) + " | load average (start, end) |",
             "|---|---|" + "---|" * (len(variants) + len(others)) + "---|"]
    by_key = {(r["condition"], r["case"], r["variant"]): r for r in rows}
    for (condition, case, variant), row in by_key.items():
        if variant != reference:
            continue
        ref_s = _best(row["seconds"])
        cells, ratios = [ref_s], []
        for other in others:
            found = by_key.get((condition, case, other))
            other_s = _best(found["seconds"]) if found else "-"
            cells.append(other_s)
            if "limit" in ref_s or other_s == "-":
                ratios.append("-")
            elif "limit" in other_s:
                ratios.append(f"> {meta['limit'] / float(ref_s):.0f}x")
            else:
                ratios.append(f"{float(other_s) / float(ref_s):.2f}x")
        load = ", ".join(f"{x:.1f}" for x in row["load_average"])
        lines.append(f"| {condition} | {case} | " + " | ".join(cells + ratios) + f" | {load} |")
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads. Command: "
              f"`{meta['command']}`. *loaded*: a second process runs a PyTorch matmul loop on every core.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
