"""One run of the separating GLUE benchmark, watched: its training curve and what each parameter group has moved.

The benchmark (``glue.py``) keeps a run's scores; when a run collapses (LaMDA++ on STS-B, seed 1: dev 49.9 where
seeds 0 and 2 reach 83.1 and 80.5) the question is *which group diverged, and when*. A probe replays that run (same
task, split, head init, data order) with the per-group learning rates (and LaMDA's freeze_ratio) given here, and
records every 8 steps:

    loss, grad_norm          the Trainer's (grad_norm before clipping)
    S_drift                  max over modules of ||S - I||_F (LaMDA's core; S starts at I)
    B_drift                  max over modules of ||B - B0||_F / ||B0||_F (B starts at B0; frozen columns stay)
    delta_rel                max over modules of ||s (B S - B0 S0) A||_F / ||W0||_F (what the adapter changed), and
                             delta_rel_module, the module where it is largest
    head_norm                ||head parameters||_F (the modules trained in full)

    python benchmarks/glue_probe.py --task STS-B --method lamda++ --lr 1e-3 --seed 1            # S by the default rule
    python benchmarks/glue_probe.py --task STS-B --method lamda++ --lr 1e-3 --seed 1 --lr-S 1e-2 # S at one given rate
    python benchmarks/glue_probe.py --task MRPC --method lamda --lr 1e-3 --seed 0 --freeze-ratio 0.7   # B for longer
    python benchmarks/glue_probe.py --report      # table of every probe + docs/results/glue_probes.png

Each probe is appended to docs/results/glue_probes.jsonl; a probe already there is skipped. A probe without --lr-S
records the default rule it ran under (``lr_S_rule``): the 49.9 replay ran under the rule before session 6 (10x lr
up to r = 8, then 10x * 8 / r), which the library no longer has.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from glue import RESULTS, SEPARATING, TASKS, one_run, score, split
from lamda_peft.optim import LAMDA_LR_S_MULTIPLIER, LAMDA_LR_S_REFERENCE_RANK

LOG = RESULTS / "glue_probes.jsonl"
EVERY = 8


@torch.no_grad()
def drift(model: torch.nn.Module) -> dict[str, float]:
    """The max drifts of every LaMDA layer's S, B and delta weight, and the norm of the head (see module doc)."""
    from peft.utils.other import ModulesToSaveWrapper

    s_drift, b_drift, delta = [0.0], [0.0], [(0.0, "")]
    head = 0.0
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            head += sum(float(p.float().pow(2).sum()) for p in module.modules_to_save.parameters())
        if not isinstance(getattr(module, "lamda_S", None), torch.nn.ParameterDict):
            continue
        for adapter, S in module.lamda_S.items():
            eye = torch.eye(S.shape[0], dtype=S.dtype)
            B, B0 = module.lamda_B[adapter], module.lamda_B0S0[adapter]
            s_drift.append(float(torch.linalg.norm(S - eye)))
            b_drift.append(float(torch.linalg.norm(B - B0) / torch.linalg.norm(B0).clamp_min(1e-12)))
            weight = module.get_base_layer().weight.float()
            delta.append((float(torch.linalg.norm(module.get_delta_weight(adapter).float()) / torch.linalg.norm(weight)),
                          name.removeprefix("base_model.model.")))
    top = max(delta)
    return {"S_drift": max(s_drift), "B_drift": max(b_drift), "delta_rel": top[0], "delta_rel_module": top[1],
            "head_norm": head ** 0.5}


class DriftRecorder(TrainerCallback):
    """Appends {step, loss, grad_norm, drifts} to ``curve`` at every log (``logging_steps=EVERY``)."""

    def __init__(self, curve: list[dict]) -> None:
        self.curve = curve

    def on_log(self, args, state, control, logs=None, model=None, **kwargs: Any):
        if logs and "loss" in logs and model is not None:
            self.curve.append({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"),
                               **drift(model)})


KEY = ("task", "method", "lr", "seed", "steps", "lr_S", "lr_S_rule", "lr_B", "lr_head", "freeze_ratio")


def probe_key(p: dict) -> tuple:
    return tuple(p.get(k) for k in KEY)


def settings(opts: argparse.Namespace) -> dict:
    """What identifies a probe; without --lr-S, the library's default rule for S's rate it runs under."""
    rule = None if opts.lr_S is not None else f"{LAMDA_LR_S_MULTIPLIER:g}x lr up to r = {LAMDA_LR_S_REFERENCE_RANK}"
    return {**{k: getattr(opts, k) for k in KEY if k != "lr_S_rule"}, "lr_S_rule": rule}


def run_probe(opts: argparse.Namespace) -> dict:
    bench = SimpleNamespace(train_size=2000, batch_size=16, r=8, **{**SEPARATING, "steps": opts.steps})
    lr_options = {k: getattr(opts, k) for k in ("lr_S", "lr_B", "lr_head") if getattr(opts, k) is not None}
    curve: list[dict] = []
    record = one_run(opts.task, opts.method, opts.lr, opts.seed, split(opts.task, bench.train_size, bench.select_size),
                     bench, lr_options=lr_options, logging_steps=EVERY, callbacks=[DriftRecorder(curve)],
                     freeze_ratio=opts.freeze_ratio)
    return {**record, **settings(opts), "curve": curve}


def report(probes: list[dict]) -> None:
    probes = sorted(probes, key=lambda q: (q["task"], q["method"], q["lr"], q["lr_S"] or 0, q["seed"]))
    lines = ["| task | method | lr | seed | lr_S | lr_B | lr_head | freeze_ratio | dev | final loss | max S drift "
             "| max B drift | max delta/W0 | head norm |", "|" + "---|" * 14]
    for p in probes:
        end = p["curve"][-1] if p["curve"] else {}
        opt = [f"{p[k]:g}" if p.get(k) is not None else "default" for k in ("lr_S", "lr_B", "lr_head", "freeze_ratio")]
        opt[0] = opt[0] if p.get("lr_S") is not None else f"default ({p.get('lr_S_rule')})"
        lines.append(f"| {p['task']} | {p['method']} | {p['lr']:g} | {p['seed']} | " + " | ".join(opt)
                     + f" | {score(p['task'], p['dev']):.1f} | {end.get('loss', float('nan')):.3f} | "
                     + " | ".join(f"{max((c[k] for c in p['curve']), default=float('nan')):.3g}"
                                  for k in ("S_drift", "B_drift", "delta_rel"))
                     + f" | {end.get('head_norm', float('nan')):.3g} |")
    (RESULTS / "glue_probes_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss", "grad_norm", "S_drift", "B_drift", "delta_rel", "head_norm")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for i, p in enumerate(probes):
        label = f"{p['task']} {p['method']} seed {p['seed']} lr_S={p.get('lr_S') or p.get('lr_S_rule')}" + (
            f" lr_B={p['lr_B']:g}" if p.get("lr_B") else "") + (f" lr_head={p['lr_head']:g}" if p.get("lr_head") else "") + (
            f" freeze_ratio={p['freeze_ratio']:g}" if p.get("freeze_ratio") is not None else "")
        steps = [c["step"] for c in p["curve"]]
        for ax, k in zip(axes.flat, keys):
            ax.plot(steps, [c[k] if c[k] is not None else np.nan for c in p["curve"]], color=f"C{i}", label=label)
            ax.set_title(k), ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_yscale("log")
    fig.tight_layout(), fig.savefig(RESULTS / "glue_probes.png", dpi=100), plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="STS-B")
    p.add_argument("--method", choices=("lamda", "lamda++", "lora-fa"), default="lamda++")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr-S", dest="lr_S", type=float, help="S's rate (default: the library's rank rule)")
    p.add_argument("--freeze-ratio", dest="freeze_ratio", type=float,
                   help="LaMDA: fraction of the steps over which B freezes (default: the library's 0.3)")
    p.add_argument("--lr-B", dest="lr_B", type=float, help="B's rate (default: lr)")
    p.add_argument("--lr-head", dest="lr_head", type=float, help="the head's rate (default: lr)")
    p.add_argument("--steps", type=int, default=SEPARATING["steps"], help="the benchmark's (change for a smoke run)")
    p.add_argument("--report", action="store_true", help="only the table and plot of the probes logged so far")
    opts = p.parse_args()
    probes = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    if not opts.report:
        wanted = probe_key(settings(opts))
        if any(probe_key(q) == wanted for q in probes):
            print(f"already in {LOG.name}: {wanted}", file=sys.stderr)
        else:
            probes.append(run_probe(opts))
            with LOG.open("a") as fh:
                fh.write(json.dumps(probes[-1]) + "\n")
    if probes:
        report(probes)


if __name__ == "__main__":
    main()
