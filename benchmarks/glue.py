"""GLUE accuracy benchmark: MiniLM with PEFT LoRA, PEFT PiSSA, LoRA-FA, LaMDA, LaMDA++ and full fine-tuning.

Fair by construction: every method gets the same rank, targets, training steps, batch and token budget; every
adapter method chooses its learning rate from the same grid (full fine-tuning from its own), on a held-out part of
the training split (never on dev), with the first seed; the chosen rate is then trained with every seed and scored
on dev.

    python benchmarks/glue.py                        # the committed run (docs/results/glue.md): about 2.5 h on 2 cores
    python benchmarks/glue.py --select-size 500 --steps 500 --max-length 128 --label long   # 5x the budget
    python benchmarks/glue.py --tasks SST-2 RTE --train-size 256 --select-size 128 --steps 25 --seeds 0 \
        --adapter-lrs 1e-3 --full-lrs 5e-5 --label reduced     # a smoke run (minutes)
    python benchmarks/glue.py --preset separating     # the rebuilt run (docs/results/glue.md): 400 steps, 128 tokens,
                                                     # widened lr grids, regression head at the label mean,
                                                     # SST-2, MRPC and STS-B (CoLA and RTE carry no signal)
    python benchmarks/glue.py --preset separating --report   # the table and plot from the log so far (no runs)

Each finished run is appended to docs/results/glue_<label>_runs.jsonl, and a rerun skips runs already there, so an
interrupted benchmark resumes (and several processes, each with its own --tasks, can share one label). The table
(glue_<label>_table.md), the summary (glue_<label>_summary.json) and the plot (glue_<label>.png) are rebuilt at the
end from every run in the log.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import lamda_peft  # noqa: F401  (registers the methods with PEFT)
from lamda_peft.apps.data import infer_spec
from lamda_peft.apps.data_loading import read_table
from lamda_peft.apps.models import minilm_path, smollm2_path
from lamda_peft.apps.tables import Table
from lamda_peft.cli.eval import evaluate, load_base
from lamda_peft.cli.train import peft_config, train_model, trainable, versions
from lamda_peft.heads import apply_regression_bias

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_driven import DATA_DRIVEN, TRAINED_AS, build, calibration_data  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
RESULTS = ROOT / "docs" / "results"
# task: (reader options, columns, the score averaged into the GLUE mean)
TASKS = {
    "SST-2": (dict(), dict(text_columns=["sentence"], label_column="label"), ("accuracy",)),
    "MRPC": (dict(), dict(text_columns=["#1 String", "#2 String"], label_column="Quality"), ("f1", "accuracy")),
    "RTE": (dict(), dict(text_columns=["sentence1", "sentence2"], label_column="label"), ("accuracy",)),
    "CoLA": (dict(header=False), dict(text_columns=["3"], label_column="1"), ("matthews_corr",)),
    "STS-B": (dict(), dict(text_columns=["sentence1", "sentence2"], label_column="score"), ("pearson", "spearman")),
}
METHODS = ("lora", "pissa", "lora-fa", "lamda", "lamda++", "full", *DATA_DRIVEN)
# Each method's learning-rate grid: the same one for every adapter method, a lower one for full fine-tuning.
ADAPTER_LRS = (1e-3, 3e-3, 1e-2)
# The separating preset (400 steps) starts one rung lower: at that budget 1e-2 sends LoRA, PiSSA and LaMDA to chance
# on SST-2, and the ladder still adds 1e-2 for a method whose choice lands on 3e-3.
SEPARATING_ADAPTER_LRS = (3e-4, 1e-3, 3e-3)
# The separating preset's budget (every task with signal: 4x the steps, 128 tokens, widened grids, the head fix).
SEPARATING = dict(steps=400, max_length=128, select_size=500, widen=True, regression_bias="label-mean")
# CoLA is left out of the preset's tasks (and its mean): MiniLM does not learn it at any budget tried. LoRA's Matthews
# correlation is 11.1 ± 3.6 at 400 steps, 11.4 at 1200 steps (training loss 0.12: it memorises the 2,000 rows) and
# 0.0 with all 8,051 rows (docs/results/glue.md, "CoLA"). `--tasks CoLA` still runs it.
# RTE is left out too (session 8): its training split (2,490 rows) is about all the preset samples, and LoRA's widened
# grid at 400 steps never leaves the majority class's 52.7: 45.5 / 52.7 / 54.5 / 47.3 at lr 1e-4 / 3e-4 / 1e-3 / 3e-3
# (seed 0); at 100 steps every method stayed at or under 54.4, full fine-tuning included. `--tasks RTE` still runs it.
SEPARATING_TASKS = ["SST-2", "MRPC", "STS-B"]
FULL_LRS = (5e-5, 1e-4)
# --model: MiniLM (22M, the benchmark's model) or SmolLM2-135M (LLaMA architecture) as a sequence classifier, to ask
# whether LaMDA's gap to LoRA is a small-model effect (issue 24, item 4)
MODELS = {"minilm": minilm_path, "smollm2": smollm2_path}


def split(task: str, train_size: int, select_size: int, seed: int = 0) -> tuple[Table, Table, Table]:
    """(train, select, dev): a seeded subsample of the training split, its held-out part, and the dev split."""
    reader, _, _ = TASKS[task]
    full = read_table(GLUE / task / "train.tsv", **reader)
    rows = list(full.rows)
    random.Random(seed).shuffle(rows)
    rows = rows[: train_size + select_size]
    dev = read_table(GLUE / task / "dev.tsv", **reader)
    return (Table(full.columns, rows[select_size:], f"{task}/train"), Table(full.columns, rows[:select_size],
            f"{task}/select"), dev)


def score(task: str, metrics: dict) -> float:
    return 100 * float(np.mean([metrics[k] for k in TASKS[task][2]]))


def training_losses(trainer) -> list[list]:
    """[[step, loss], ...] from the Trainer's log (every ``logging_steps``), rounded for the run logs."""
    return [[e["step"], round(e["loss"], 4)] for e in trainer.state.log_history if "loss" in e]


def one_run(task: str, method: str, lr: float, seed: int, data, opts, lr_options: dict | None = None,
            logging_steps: int | None = None, callbacks: tuple = (), freeze_ratio: float | None = None) -> dict:
    """Train one method on one task and score it on the held-out rows and dev. ``lr_options`` (lr_S, lr_B,
    lr_head), ``callbacks`` and ``freeze_ratio`` are for probes (glue_probe.py); the benchmark uses the library's
    defaults."""
    train, select, dev = data
    spec = infer_spec(train, dev, **TASKS[task][1], max_length=opts.max_length)
    torch.manual_seed(seed)  # the head's init too
    model, tokenizer = load_base(MODELS[opts.model](), spec.task, len(spec.classes or []) or 2)
    if opts.regression_bias == "label-mean" and spec.task == "regression":  # the STS-B collapse fix, every method
        apply_regression_bias(model, spec.task, train.column(spec.label_column), "label-mean")
    from peft import get_peft_model

    if method in DATA_DRIVEN:  # LoRA-GA, EVA, CorDA, LaMDA (gradient): calibrated on training batches
        batches = calibration_data(spec, tokenizer, spec.encode(train, tokenizer), opts.batch_size, seed)
        model = build(method, model, batches, opts.r, seed)
    else:
        cfg = peft_config(method, opts.r, 2.0 * opts.r, "all-linear", spec.task, freeze_ratio)
        model = model if cfg is None else get_peft_model(model, cfg)
    start = trainable(model)
    args = SimpleNamespace(batch_size=opts.batch_size, lr=lr, epochs=None, max_steps=opts.steps, seed=seed,
                           eval_steps=None, method=TRAINED_AS.get(method, method), logging_steps=logging_steps,
                           **(lr_options or {}))
    began = time.time()
    trainer = train_model(model, tokenizer, spec, spec.encode(train, tokenizer), None, args, Path("/tmp/glue-bench"),
                          callbacks=callbacks)
    if args.method in ("lamda", "lamda++") and freeze_ratio != 0 and trainable(model) >= start:
        raise RuntimeError(f"{method}: B did not freeze ({start} trainable at the start and at the end)")
    return {
        "task": task, "method": method, "lr": lr, "seed": seed, "model": opts.model, "steps": trainer.state.global_step,
        "train_loss": training_losses(trainer),
        "trainable_start": start, "trainable_end": trainable(model), "train_seconds": round(time.time() - began, 1),
        "select": evaluate(model, tokenizer, spec, spec.encode(select, tokenizer), 64),
        "dev": evaluate(model, tokenizer, spec, spec.encode(dev, tokenizer), 64),
        "provenance": provenance(),
    }


# With --widen, a method whose chosen lr sits at an edge of its grid gets the next rung of its ladder on that side,
# until the choice is interior (or the ladder ends): no method's best is cut off by the grid.
ADAPTER_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FULL_LADDER = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4)


def lr_grid(method: str, opts, runs: list[dict] | None = None, task: str | None = None) -> list[float]:
    """The method's grid, plus (with --widen) the ladder rungs already added for ``task`` in the log."""
    grid = list(opts.full_lrs if method == "full" else opts.adapter_lrs)
    if getattr(opts, "widen", False) and runs is not None:
        ladder = FULL_LADDER if method == "full" else ADAPTER_LADDER
        grid += sorted({r["lr"] for r in runs if r["task"] == task and r["method"] == method
                        and r["seed"] == opts.seeds[0] and r["lr"] in ladder} - set(grid))
    return sorted(grid)


def next_rung(runs: list[dict], task: str, method: str, opts) -> float | None:
    """The ladder rung beyond the chosen lr when that lr is at an edge of the (widened) grid, else None."""
    grid = lr_grid(method, opts, runs, task)
    lr = chosen_lr(runs, task, method, opts)
    ladder = list(FULL_LADDER if method == "full" else ADAPTER_LADDER)
    if lr is None or lr not in ladder or lr not in (grid[0], grid[-1]) or len(grid) == 1:
        return None
    i = ladder.index(lr) + (-1 if lr == grid[0] else 1)
    return ladder[i] if 0 <= i < len(ladder) and ladder[i] not in grid else None


def chosen_lr(runs: list[dict], task: str, method: str, opts) -> float | None:
    """The lr of the method's grid with the best held-out score at the first seed (None before any such run)."""
    grid = lr_grid(method, opts, runs, task)
    tried = [r for r in runs if r["task"] == task and r["method"] == method and r["seed"] == opts.seeds[0]
             and r["lr"] in grid]
    return max(tried, key=lambda r: score(task, r["select"]))["lr"] if tried else None


def summarize(runs: list[dict], opts) -> tuple[list[dict], dict]:
    """Per task and method: the lr of its grid with the best held-out score (seed 0), then dev mean and spread over
    seeds. Runs in the log at other learning rates (another grid's) are ignored."""
    rows, best = [], {}
    for task in opts.tasks:
        for method in opts.methods:
            lr = chosen_lr(runs, task, method, opts)
            if lr is None:
                continue
            final = [r for r in runs if r["task"] == task and r["method"] == method and r["lr"] == lr]
            dev = [score(task, r["dev"]) for r in final]
            rows.append({"task": task, "method": method, "lr": lr, "seeds": len(final), "dev_mean": float(np.mean(dev)),
                         "dev_std": float(np.std(dev)), "trainable_start": final[0]["trainable_start"],
                         "trainable_end": final[0]["trainable_end"],
                         "dev_by_seed": {r["seed"]: score(task, r["dev"]) for r in final}})
            best[(task, method)] = rows[-1]
    for row in rows:  # paired with LoRA: the same seed (same data order and head init), each at its chosen lr
        lora = best.get((row["task"], "lora"))
        diffs = [] if lora is None else [v - lora["dev_by_seed"][k] for k, v in row["dev_by_seed"].items()
                                         if k in lora["dev_by_seed"]]
        row["diff_to_lora"] = {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)), "seeds": len(diffs)} \
            if diffs else None
    return rows, best


def paired_mean_difference(best: dict, method: str, tasks: list[str]) -> dict | None:
    """The method's task-mean minus LoRA's, per seed present for every task of both, then mean ± std over seeds."""
    cells = [(best.get((t, method)), best.get((t, "lora"))) for t in tasks]
    if any(m is None or l is None for m, l in cells):
        return None
    seeds = set.intersection(*[set(m["dev_by_seed"]) & set(l["dev_by_seed"]) for m, l in cells])
    diffs = [np.mean([m["dev_by_seed"][k] - l["dev_by_seed"][k] for m, l in cells]) for k in sorted(seeds)]
    return {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)), "seeds": len(diffs)} if diffs else None


def _score_cell(row: dict, seeds_planned: int) -> str:
    """'mean ± std (lr X)', marked while the cell has fewer seeds than planned (a partial log)."""
    so_far = "" if row["seeds"] >= seeds_planned else f", {row['seeds']} seed(s) so far"
    return f"{row['dev_mean']:.1f} ± {row['dev_std']:.1f} (lr {row['lr']:g}{so_far})"


def grid_lines(runs: list[dict], opts) -> list[str]:
    """Every learning rate tried at the first seed: dev (held-out) per task and method, the held-out choice in bold.
    Shows where each choice sits in its grid and which rates collapse, without reading the run log."""
    first = [r for r in runs if r["seed"] == opts.seeds[0] and r["task"] in opts.tasks and r["method"] in opts.methods]
    lrs = sorted({r["lr"] for r in first})
    lines = [f"Every learning rate at seed {opts.seeds[0]}: dev (held-out), the held-out choice in bold:", "",
             "| task, method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
    for task in opts.tasks:
        for method in opts.methods:
            tried = {r["lr"]: r for r in first if r["task"] == task and r["method"] == method}
            if not tried:
                continue
            chosen = chosen_lr(runs, task, method, opts)
            cells = []
            for lr in lrs:
                r = tried.get(lr)
                cell = "" if r is None else f"{score(task, r['dev']):.1f} ({score(task, r['select']):.1f})"
                cells.append(f"**{cell}**" if r is not None and lr == chosen else cell)
            lines.append(f"| {task}, {method} | " + " | ".join(cells) + " |")
    return lines


def write_report(runs: list[dict], opts, stem: str) -> None:
    rows, best = summarize(runs, opts)
    methods = [m for m in opts.methods if any(k[1] == m for k in best)]
    # A task mean only over every task: a partial log (a run still under way) must not compare means of other tasks.
    means = {m: np.mean([best[(t, m)]["dev_mean"] for t in opts.tasks]) if all((t, m) in best for t in opts.tasks)
             else float("nan") for m in methods}
    header = "| method | trainable at start | at end | " + " | ".join(opts.tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(opts.tasks) + 4)]
    for m in methods:
        any_row = next(best[(t, m)] for t in opts.tasks if (t, m) in best)
        cells = [_score_cell(best[(t, m)], len(opts.seeds)) if (t, m) in best else "-" for t in opts.tasks]
        lines.append(f"| {m} | {any_row['trainable_start']:,} | {any_row['trainable_end']:,} | "
                     + " | ".join(cells) + (" | - |" if np.isnan(means[m]) else f" | {means[m]:.1f} |"))
    lines += ["", "Paired difference to LoRA (same seed, each at its chosen lr; mean ± std over seeds, n seeds):", "",
              "| method | " + " | ".join(opts.tasks) + " | mean over tasks |", "|" + "---|" * (len(opts.tasks) + 2)]
    for m in methods:
        if m == "lora":
            continue
        cells = []
        for t in opts.tasks:
            d = best[(t, m)]["diff_to_lora"] if (t, m) in best else None
            cells.append(f"{d['mean']:+.1f} ± {d['std']:.1f} (n={d['seeds']})" if d else "-")
        d = paired_mean_difference(best, m, opts.tasks)
        lines.append(f"| {m} | " + " | ".join(cells) + " | "
                     + (f"{d['mean']:+.1f} ± {d['std']:.1f} (n={d['seeds']})" if d else "-") + " |")
    lines += ["", *grid_lines(runs, opts)]
    (RESULTS / f"{stem}_table.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}_summary.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "options": vars(opts), "versions": versions(), "rows": rows},
        indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, trade) = plt.subplots(1, 2, figsize=(8 + 1.2 * len(opts.tasks), 4.2),
                                    gridspec_kw={"width_ratios": [1.6 + 0.25 * len(opts.tasks), 1]})
    # With LoRA in the log the bars are each method's paired difference to it: a bar from zero on a 0-100 scale hides
    # the 1-5 points that separate the methods.
    paired = any((t, "lora") in best for t in opts.tasks)
    barred = [m for m in methods if not (paired and m == "lora")]
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 methods
    color = {m: colors[2 * i % 20 + (2 * i // 20) % 2] for i, m in enumerate(methods)}
    width = 0.8 / max(len(barred), 1)
    for m in methods:
        if m in barred:  # (mean, std) per task: of the paired difference, or of the score; (0, 0) where not run
            cells = [best.get((t, m)) or {} for t in opts.tasks]
            bars = [(c["diff_to_lora"]["mean"], c["diff_to_lora"]["std"]) if paired and c.get("diff_to_lora")
                    else (0.0, 0.0) if paired or not c else (c["dev_mean"], c["dev_std"]) for c in cells]
            x = np.arange(len(opts.tasks)) + barred.index(m) * width
            ax.bar(x, [b[0] for b in bars], width, yerr=[b[1] for b in bars], label=m, color=color[m])
    label_points(trade, {m: (next(best[(t, m)]["trainable_end"] for t in opts.tasks if (t, m) in best), means[m])
                         for m in methods if not np.isnan(means[m])}, color)  # NaN: not every task run yet
    ax.set_xticks(np.arange(len(opts.tasks)) + 0.4 - width / 2, opts.tasks)
    if paired:
        ax.axhline(0, color=color.get("lora", "black"), lw=1, label="lora (zero line)")
        ax.set_ylabel("dev score minus LoRA's (x100, paired by seed),\nmean ± std over seeds")
    else:
        ax.set_ylabel("dev score (x100), mean ± std over seeds")
    ax.set_title(f"GLUE dev, {'SmolLM2-135M' if opts.model == 'smollm2' else 'MiniLM'}, r={opts.r}, {opts.steps} steps "
                 f"({opts.label})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(5, len(methods)), frameon=False)
    trade.set_xscale("log"), trade.set_xlabel("trainable parameters at the end of training")
    trade.set_ylabel("GLUE mean (x100)"), trade.set_title("score vs trainable parameters")
    fig.tight_layout(), fig.savefig(RESULTS / f"{stem}.png", dpi=100), plt.close(fig)
    print("\n".join(lines))


def label_points(ax, points: dict[str, tuple[float, float]], color: dict) -> None:
    """Scatter {name: (trainable parameters, score)} on a log-x axis, each named beside its point; a name that would
    cover one already placed (points within a decade and a few tenths of a point) moves down a line."""
    if not points:
        return
    scores = [y for _, y in points.values()]
    line = max(max(scores) - min(scores), 1.0) / 14  # about one label's height in score units
    placed: list[tuple[float, float]] = []
    for name, (x, y) in sorted(points.items(), key=lambda item: -item[1][1]):
        ax.scatter(x, y, color=color[name], s=40)
        shift = 0
        while any(abs(np.log10(x) - px) < 1.0 and abs(y - shift * line - py) < 0.9 * line for px, py in placed):
            shift += 1
        placed.append((np.log10(x), y - shift * line))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 2 - 10 * shift), fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if shift else None)


def read_runs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_unless_logged(log: Path, task: str, method: str, lr: float, seed: int, data, opts) -> list[dict]:
    """Run the cell unless the log has it, and return the whole log. The log is read again before every cell, so
    processes sharing a label (each with its own --tasks or --methods) never repeat a cell another one finished."""
    runs = read_runs(log)
    if not any((r["task"], r["method"], r["lr"], r["seed"]) == (task, method, lr, seed) for r in runs):
        run = one_run(task, method, lr, seed, data, opts)
        with log.open("a") as fh:
            fh.write(json.dumps(run) + "\n")
        runs = read_runs(log)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: every task (the separating preset: "
                                                                  "SST-2, MRPC and STS-B)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--train-size", type=int, default=2000, help="training rows (subsampled, seeded)")
    p.add_argument("--select-size", type=int, default=300, help="held-out training rows for choosing the lr")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--model", choices=list(MODELS), default="minilm",
                   help="the base model (smollm2: SmolLM2-135M as a sequence classifier; give it its own --label)")
    p.add_argument("--adapter-lrs", type=float, nargs="+", default=list(ADAPTER_LRS),
                   help="the learning-rate grid of every adapter method (chosen on the held-out rows)")
    p.add_argument("--full-lrs", type=float, nargs="+", default=list(FULL_LRS),
                   help="the learning-rate grid of full fine-tuning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--label", default="budget", help="names the result files: docs/results/glue_<label>*")
    p.add_argument("--widen", action="store_true", help="extend a method's grid along its ladder while its chosen lr "
                                                        "is at an edge")
    p.add_argument("--regression-bias", choices=("label-mean", "zero"), default="zero",
                   help="label-mean: the regression head starts at the label mean (the STS-B collapse fix)")
    p.add_argument("--preset", choices=("separating",), help="separating: the rebuilt benchmark (see module doc)")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the table, summary and plot from the run log (a partial log too: cells not run "
                        "yet show '-', and a task mean needs every task)")
    opts = p.parse_args()
    if opts.preset == "separating":  # every task with signal: 4x the steps, 128 tokens, widened grids, head fix
        vars(opts).update({**SEPARATING, "steps": max(opts.steps, SEPARATING["steps"])})
        opts.label = opts.label if opts.label != "budget" else "separating"
        opts.tasks = opts.tasks or list(SEPARATING_TASKS)
        if opts.adapter_lrs == list(ADAPTER_LRS):  # not set on the command line
            opts.adapter_lrs = list(SEPARATING_ADAPTER_LRS)
    opts.tasks = opts.tasks or list(TASKS)
    if opts.model != "minilm" and opts.label in ("budget", "separating"):
        sys.exit(f"--model {opts.model}: give it its own --label (the {opts.label} log holds MiniLM runs), e.g. "
                 f"--label {opts.label}_{opts.model}")
    if not GLUE.is_dir():
        sys.exit(f"GLUE data not found at {GLUE} (the benchmark reads ../shared/data/glue)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"glue_{opts.label}"
    log = RESULTS / f"{stem}_runs.jsonl"
    runs = read_runs(log)
    if opts.report:
        if not runs:
            sys.exit(f"no runs in {log} yet: run the benchmark first")
        write_report(runs, opts, stem)
        return
    for task in opts.tasks:
        data = split(task, opts.train_size, opts.select_size)
        for method in opts.methods:
            todo = lr_grid(method, opts)
            while todo:  # selection: every lr with the first seed; with --widen, extend the grid at an edge
                for lr in todo:
                    runs = run_unless_logged(log, task, method, lr, opts.seeds[0], data, opts)
                rung = next_rung(runs, task, method, opts) if opts.widen else None
                todo = [rung] if rung is not None else []
            lr = chosen_lr(runs, task, method, opts)
            for seed in opts.seeds[1:]:  # final numbers: the chosen lr with every seed
                runs = run_unless_logged(log, task, method, lr, seed, data, opts)
            print(f"{task} {method}: lr {lr:g}, {len([r for r in runs if r['task'] == task])} runs so far", flush=True)
    write_report(runs, opts, stem)


if __name__ == "__main__":
    main()
