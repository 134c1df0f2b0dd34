"""GSM8K with SmolLM2-135M-Instruct: the same number of steps for every method, then the response-token loss on
the test split and the final-answer exact match (greedy, ``#### N``) on a fixed sample of it.

    python benchmarks/gsm8k.py                       # long: 1000 training rows, 300 steps, whole test loss
    python benchmarks/gsm8k.py --methods lora lamda lamda++ --train-size 1000 --steps 30 --batch-size 4 \
        --max-length 320 --test-size 100 --em-size 20 --max-new-tokens 200 --lr 1e-3 --label budget
                                                     # the committed run (docs/results/gsm8k.md, under an hour)
    python benchmarks/gsm8k.py --label separating <its options> --report   # table and plot from the log so far
    python benchmarks/gsm8k.py --methods lora lamda --train-size 64 --steps 8 --test-size 24 --em-size 4 \
        --max-new-tokens 96 --label reduced          # a reduced run (minutes)

The untrained base model is scored too (method "base"). Results: docs/results/gsm8k_<label>{.md,.png,.json}; every
finished method is appended to docs/results/gsm8k_<label>_runs.jsonl, and a rerun resumes from it; a method's
training itself resumes from its last checkpoint (every --checkpoint-every steps, under runs/gsm8k-<label>/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import lamda_peft  # noqa: F401  (registers the methods with PEFT)
from lamda_peft.apps.data import infer_spec
from lamda_peft.apps.data_loading import read_table
from lamda_peft.apps.models import smollm2_path
from lamda_peft.apps.tables import Table
from lamda_peft.cli.checkpoints import checkpoints
from lamda_peft.cli.eval import evaluate, generation_report, load_base
from lamda_peft.cli.train import peft_config, train_model, trainable, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_driven import DATA_DRIVEN, TRAINED_AS, build, calibration_data  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
RESULTS = ROOT / "docs" / "results"
METHODS = ("lora", "pissa", "lora-fa", "lamda", "lamda++", "full", "lora-ga", "lamda-gradient", "lamda++-gradient")


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of an exact-match rate on n problems (honest at 0 and at small n)."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The last ``checkpoint-N`` the Trainer finished writing (a run killed while saving leaves one without its
    trainer state or optimizer)."""
    done = [c for c in checkpoints(folder) if all((c / f).is_file() for f in ("trainer_state.json", "optimizer.pt",
                                                                              "scheduler.pt"))]
    return done[-1] if done else None


def run_method(method: str, train: Table, test: Table, opts) -> dict:
    spec = infer_spec(train, test, task="causal-lm", max_length=opts.max_length)
    model, tokenizer = load_base(smollm2_path(), "causal-lm")
    torch.manual_seed(opts.seed)
    result: dict = {"method": method}
    began = time.time()
    if method != "base":
        from peft import get_peft_model

        if method in DATA_DRIVEN:  # LoRA-GA, LaMDA (gradient): calibrated on 8 shuffled training batches
            batches = calibration_data(spec, tokenizer, spec.encode(train, tokenizer), opts.batch_size, opts.seed)
            model = build(method, model, batches, opts.r, opts.seed, task_type="CAUSAL_LM")
        else:
            cfg = peft_config(method, opts.r, 2.0 * opts.r, "all-linear", "causal-lm", None)
            model = model if cfg is None else get_peft_model(model, cfg)
        result["trainable_start"] = trainable(model)
        lr = opts.lr_full if method == "full" else opts.lr
        args = SimpleNamespace(batch_size=opts.batch_size, lr=lr, epochs=None, max_steps=opts.steps,
                               seed=opts.seed, eval_steps=None, method=TRAINED_AS.get(method, method),
                               save_steps=opts.checkpoint_every)
        # A method's training resumes from its last complete checkpoint (a stopped session loses at most
        # --checkpoint-every steps); the folder goes once the method's result is in the run log.
        workdir = ROOT / "runs" / f"gsm8k-{opts.label}" / method
        resume = last_complete_checkpoint(workdir)
        if resume is not None:
            result["resumed_from"] = resume.name
            print(f"{method}: resuming from {resume}", flush=True)
        train_model(model, tokenizer, spec, spec.encode(train, tokenizer), None, args, workdir, resume=resume)
        result |= {"trainable_end": trainable(model), "lr": lr}
    result["train_seconds"] = round(time.time() - began, 1)
    result["provenance"] = provenance()
    result["test"] = evaluate(model, tokenizer, spec, spec.encode(test, tokenizer), opts.eval_batch_size)
    gen = generation_report(model, tokenizer, spec, test, opts.em_size, opts.max_new_tokens, opts.eval_batch_size)
    result["exact_match"], result["samples"] = gen.get("final_answer_exact_match"), gen["samples"][:2]
    print(f"{method}: test loss {result['test']['loss']:.4f}, exact match {result['exact_match']}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=1319, help="test rows for the loss (first N of the split)")
    p.add_argument("--em-size", type=int, default=100, help="test rows for the exact match (first N)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the adapter methods")
    p.add_argument("--lr-full", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="full")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the table, JSON and plot from the run log (the methods finished so far)")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="steps between checkpoints under runs/gsm8k-<label>/<method> (a stopped run resumes there)")
    p.add_argument("--eval-batch-size", type=int, default=16,
                   help="batch of the test loss and of greedy generation (speed only: padding is masked)")
    opts = p.parse_args()
    if not GSM8K.is_dir():
        sys.exit(f"GSM8K not found at {GSM8K} (the benchmark reads ../shared/data/gsm8k)")
    train = read_table(GSM8K / "train.jsonl")
    train.rows = train.rows[: opts.train_size]
    test = read_table(GSM8K / "test.jsonl")
    test.rows = test.rows[: opts.test_size]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"gsm8k_{opts.label}"
    # Each finished method is appended to the run log at once; a rerun with the same options skips those already
    # there (a run of hours resumes where it stopped). A log written with other options is refused, not mixed in.
    log = stem.with_name(stem.name + "_runs.jsonl")
    setting = {k: v for k, v in vars(opts).items()
               if k not in ("methods", "label", "eval_batch_size", "checkpoint_every", "report")}  # these change no result
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for run in done:
        if run["options"] != setting:
            sys.exit(f"{log} holds runs with other options ({run['options']}); use another --label")
    results = []
    for method in ["base", *opts.methods]:
        previous = next((r for r in done if r["method"] == method), None)
        if previous is None and opts.report:
            continue
        if previous is None:
            previous = run_method(method, train, test, opts) | {"options": setting}
            with log.open("a") as fh:
                fh.write(json.dumps(previous) + "\n")
            shutil.rmtree(ROOT / "runs" / f"gsm8k-{opts.label}" / method, ignore_errors=True)
        results.append(previous)
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "options": vars(opts), "versions": versions(),
         "results": results}, indent=2) + "\n")
    if not results:
        sys.exit(f"no runs in {log} yet: run the benchmark first")
    lines = ["| method | trainable at start | at end | lr | test loss (response tokens) | exact match (95% CI) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        k = round(r["exact_match"] * opts.em_size) if r["exact_match"] is not None else None
        em = "-" if k is None else (f"{100 * r['exact_match']:.1f}% of {opts.em_size} "
                                    "({:.1f}-{:.1f})".format(*(100 * x for x in wilson_interval(k, opts.em_size))))
        lines.append(f"| {r['method']} | {r.get('trainable_start', 0):,} | {r.get('trainable_end', 0):,} | "
                     f"{r.get('lr', '-')} | {r['test']['loss']:.4f} | {em} |")
    stem.with_name(stem.name + "_table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [r["test"]["loss"] for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(results)), 3.8))
    bars = ax.bar([r["method"] for r in results], losses)
    ax.bar_label(bars, labels=[f"{loss:.3f}" for loss in losses], fontsize=8)  # the differences are small
    lora = next((r["test"]["loss"] for r in results if r["method"] == "lora"), None)
    if lora is not None:
        ax.axhline(lora, color="gray", linestyle="--", linewidth=0.8, label="LoRA")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("test loss, response tokens"), ax.set_title(f"GSM8K, SmolLM2-135M, {opts.steps} steps ({opts.label})")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylim(min(losses) * 0.95, max(losses) * 1.04)
    fig.tight_layout(), fig.savefig(stem.with_suffix(".png"), dpi=100), plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
