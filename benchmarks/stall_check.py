"""How well LamdaCallback's stall check (``lamda_peft.stall``) foretells a run's score, on every logged LaMDA run.

Reads the committed run logs that keep each run's training curve, computes for each run the ratio the callback logs
(mean loss over the last third of the freezing window over that over its first third) and splits the runs into
those the callback would warn about (a fall of less than 10%) and the others:

    lamda_ablation_runs.jsonl    SST-2, 100 and 400 steps, many settings (runs without the callback are left out)
    glue_separating_runs.jsonl   LaMDA and LaMDA++ on the separating GLUE benchmark (400 steps)
    glue_probes.jsonl            the replays under S's rate before session 6 (10x), one of which stalled

    python benchmarks/stall_check.py      # writes docs/results/stall_check.md

No training: seconds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lamda_peft import LamdaConfig
from lamda_peft.stall import DEFAULT_MIN_DECREASE, loss_ratio

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
DEFAULT_FREEZE_RATIO = LamdaConfig().freeze_ratio  # the runs that did not set it ran with the library's default
CHANCE_MARGIN = 0.05  # "at chance": a dev score within 5 points of the best constant prediction's


def dev_score(run: dict) -> float:
    """Accuracy for classification, Pearson for STS-B."""
    return run["dev"]["accuracy"] if "accuracy" in run["dev"] else run["dev"]["pearson"]


def at_chance(run: dict, score: float) -> bool:
    """SST-2: the dev majority class is 50.9%; STS-B: a constant prediction has Pearson 0; MRPC/RTE: majority."""
    constant = {"STS-B": 0.0, "SST-2": 0.509, "MRPC": 0.684, "RTE": 0.527}.get(run.get("task", "SST-2"), 0.5)
    return score <= constant + CHANCE_MARGIN


def load_runs() -> list[dict]:
    """Every LaMDA run with a training curve and a freezing schedule: source, task, steps, ratio, score."""
    runs = []
    sources = [("ablation", "lamda_ablation_runs.jsonl"), ("GLUE", "glue_separating_runs.jsonl"),
               ("GLUE probe, S at 10x", "glue_probes.jsonl")]
    for source, name in sources:
        for line in (RESULTS / name).read_text().splitlines():
            run = json.loads(line)
            if not run["method"].startswith("lamda") or not run.get("train_loss"):
                continue
            if source.startswith("GLUE probe") and not (run.get("lr_S_rule") or "").startswith("10x"):
                continue  # the other probes are in the GLUE log already
            ratio_setting = run.get("freeze_ratio", DEFAULT_FREEZE_RATIO)
            if ratio_setting is None:
                continue  # the ablation's "B never frozen": no callback, no check
            end = math.ceil(ratio_setting * run["steps"])
            ratio = loss_ratio(run["train_loss"], end)
            if ratio is None:
                continue
            score = dev_score(run)
            runs.append({"source": source, "task": run.get("task", "SST-2"), "steps": run["steps"], "ratio": ratio,
                         "score": score, "chance": at_chance(run, score)})
    return runs


def summary(runs: list[dict]) -> str:
    if not runs:
        return "-"
    scores = [100 * r["score"] for r in runs]
    return (f"{len(runs)} run{'s' if len(runs) > 1 else ''}: mean {statistics.mean(scores):.1f}, min {min(scores):.1f}, "
            f"{sum(r['chance'] for r in runs)} at chance")


def main() -> None:
    runs = load_runs()
    limit = 1 - DEFAULT_MIN_DECREASE
    groups = sorted({(r["source"], r["task"], r["steps"]) for r in runs})
    lines = [f"# The stall check on logged LaMDA runs (warn: the loss fell less than {DEFAULT_MIN_DECREASE:.0%} "
             "over the freezing window)", "",
             "Written by `python benchmarks/stall_check.py` from the committed run logs (MiniLM, r = 8 unless the "
             "ablation varied it). Score: dev accuracy (SST-2) or Pearson (STS-B), in points; at chance: within 5 "
             "points of the best constant prediction.", "",
             "| runs | steps | warned | not warned |", "|---|---|---|---|"]
    for source, task, steps in groups:
        mine = [r for r in runs if (r["source"], r["task"], r["steps"]) == (source, task, steps)]
        warned = [r for r in mine if r["ratio"] > limit]
        quiet = [r for r in mine if r["ratio"] <= limit]
        lines.append(f"| {source}, {task} | {steps} | {summary(warned)} | {summary(quiet)} |")
    warned = [r for r in runs if r["ratio"] > limit]
    quiet = [r for r in runs if r["ratio"] <= limit]
    lines += [f"| all | | {summary(warned)} | {summary(quiet)} |", "",
              f"Runs that ended at chance: {sum(r['chance'] for r in runs)}, of which the check warned about "
              f"{sum(r['chance'] for r in warned)}."]
    (RESULTS / "stall_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
