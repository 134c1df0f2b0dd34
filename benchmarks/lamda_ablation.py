"""Why does LaMDA learn worse than LoRA at the same budget? Ablations on SST-2 (MiniLM, r=8, all-linear).

Same data as ``benchmarks/glue.py`` (a seeded 2,000-row training sample, 300 held-out rows, the 872-row dev split),
64 tokens, batch 16, AdamW with linear decay; every run is one *cell*: a method and its settings, a number of steps
and a seed. The knobs (each defaults to the committed LaMDA/CLI setting):

    lr, lr_S, lr_B, lr_head   per-group learning rates (lamda_peft.optim.lamda_param_groups); None = lr (not the
                              library's default multipliers: the ablation's reference is one lr for everything)
    freeze_ratio              fraction of the steps over which B freezes column by column (1.0: the last column
                              freezes at the last step, so on average half of B is frozen; None: no freezing at all)
    warmup                    warmup fraction of the steps (the CLI uses 0.06)
    alpha                     lora_alpha (s = alpha / r; the CLI uses 2 r); "rs" prefix: rsLoRA, alpha * sqrt(r)
    init                      spectral (paper: top-r SVD, S = I), spectral_zero (S = 0), random (random A, B = 0),
                              gradient (A, B0 span the top-r singular subspaces of the loss gradient wrt W0 over
                              the calibration batches; lamda_peft.initialize),
                              activations (A spans the top-r principal directions of the layer's input activations
                              over 8 calibration batches of 16 training sentences, ~1,700 tokens, scaled like
                              spectral; lamda_peft.initialize_from_activations. The runs of plans gap and
                              confirm400 used a prototype in this script with the same math, factors equal to
                              4e-12; plans after, after2 and combined the library function)
    subspace                  top (paper), minor (the r smallest singular directions; ablation only)
    freeze_order              largest_first (default: the columns of the largest singular values freeze first),
                              smallest_first (LamdaConfig.freeze_order)
    r                         the rank (alpha is set with it, as alpha = 2 r everywhere)
    train_size                training rows (default 2,000; the same seeded shuffle, so a larger sample contains
                              the smaller one; the held-out and dev rows do not change)
    calibration               examples of the data-driven inits (activations, gradient): batches of 16 (default 128)
    head_warmup               gradient init: head-only AdamW steps before the gradient is taken (default 0)
    init=gradient_sign        (ablation only) LoRA-SB's subspace: A, B0 from the top-r SVD of one simulated Adam step
                              on the accumulated gradient, G / (|G| + 1e-8) (elementwise, ~sign(G): it needs each
                              module's full G, so the library's sketch cannot give it), scaled like init=gradient
    s0                        gradient inits: identity (default, S0 = I) or singular (ablation only: S0 = diag of G's
                              top-r singular values over their mean, B0S0 = B S0; the same c, so S0's mean is 1)
    power_iterations          gradient init: the randomized sketch's power iterations q (default 1; 0 halves the
                              calibration passes, lamda_peft.initialize(..., power_iterations=0))
    weight_decay              AdamW's decoupled weight decay on every group but biases and norms (default 0)
    decay_anchor              True (default): LaMDA's S and B decay toward S0 and B0S0 (lamda_peft.anchored_decay);
                              False: toward 0, as before issue 25

    python benchmarks/lamda_ablation.py --plan diagnose           # the cells of one plan (see PLANS)
    python benchmarks/lamda_ablation.py --plan diagnose --shard 1/2   # half of them (run two processes)
    python benchmarks/lamda_ablation.py --report                  # table + plot from the log only
    python benchmarks/lamda_ablation.py --subspace-energy         # input energy in span(A): spectral vs activations

Every finished run is appended to docs/results/lamda_ablation_runs.jsonl (``--log FILE``: to another log, with its own
table and plot beside it, e.g. for an independent rerun) with its provenance (commit, library versions, host); a rerun
skips the cells already in the log.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lamda_peft  # noqa: E402,F401
from ablation_common import DEFAULTS, R, RESULTS, calibration_batches, cell, key, lamda_config  # noqa: E402
from glue import TASKS, split, training_losses  # noqa: E402
from lamda_peft import initialize_from_activations  # noqa: E402
from lamda_peft.apps.data import infer_spec  # noqa: E402
from lamda_peft.apps.models import minilm_path  # noqa: E402
from lamda_peft.cli.eval import collator_for, evaluate, load_base  # noqa: E402
from lamda_peft.optim import describe_groups, lamda_param_groups  # noqa: E402
from provenance import provenance  # noqa: E402

LOG = RESULTS / "lamda_ablation_runs.jsonl"  # the committed log; --log writes another one (and its table and plot)


def _grid(steps: tuple[int, ...], seeds: tuple[int, ...], variants: list[dict]) -> list[dict]:
    return [cell(steps=t, seed=s, **v) for t in steps for s in seeds for v in variants]


# Plans, in the order they were run. Each variant is a dict of knobs that differ from DEFAULTS.
RULE = dict(lr_S=1e-2, lr_B=3e-4)  # the "matched step" rule at lr 1e-3: lr_S = 10 lr, lr_B = lr / 3 (see step sizes)
PLANS: dict[str, list[dict]] = {
    # 1. where the gap comes from (seed 0, 100 steps). LoRA / LoRA-FA baselines: glue_budget_runs.jsonl (same split).
    "diagnose": _grid((100,), (0,), [dict(), dict(lr_S=1e-2)]),
    # 2. the lr rule suggested by --step-sizes, the head, and the 10x lr range; then the other knobs with the rule.
    #    Two lists, one per process (on the shared 2-core machine a 100-step run took ~12-15 minutes).
    "rule_a": _grid((100,), (0,), [RULE, dict(lr_S=1e-2, lr_head=1e-2), dict(lr_head=1e-2),
                                   dict(lr=3e-4, lr_S=3e-3, lr_B=1e-4),
                                   dict(RULE, freeze_ratio=1.0), dict(RULE, alpha="rs16"), dict(RULE, warmup=0.0),
                                   dict(RULE, init="spectral_zero"), dict(RULE, subspace="minor")])
    + _grid((100,), (1,), [RULE, dict()]),
    "rule_b": _grid((100,), (0,), [dict(lr=3e-3, lr_S=3e-2, lr_B=1e-3)]) + _grid((100,), (1, 2), [RULE])
    + _grid((400,), (0,), [RULE, dict(method="lora")]),
    # 3. the new default (lr_S = 10 lr, B and head at lr): a second seed, and the bottom of the 10x lr range
    "default_b": _grid((100,), (1,), [dict(lr_S=1e-2)]) + _grid((100,), (0,), [dict(lr=3e-4, lr_S=3e-3)]),
    "default_a": _grid((100,), (0,), [dict(lr=3e-4, lr_S=3e-3)]),
    # 4. is the bottom of the 10x range (lr 3e-4) too slow for every method at 100 steps, or for LaMDA only?
    "range": _grid((100,), (0,), [dict(method="lora", lr=3e-4), dict(method="lora-fa", lr=3e-4)]),
    "default_c": _grid((100,), (1,), [dict()]) + _grid((100,), (2,), [dict(lr_S=1e-2)])
    + _grid((100,), (0, 1, 2), [dict(method="lora")])
    + _grid((400,), (0,), [dict(lr_S=1e-2)]),
    # 5. (session 2) which part of the gap to LoRA is B's freezing, B's lr, or A's subspace. Seed 0 of every variant
    #    first, so that a line of inquiry can stop after one seed. Default now: lr_S = 10 lr, B and head at lr.
    #    freeze_ratio=1.0 still freezes B gradually (all of it at the last step); None = B never frozen.
    "gap": _grid((100,), (0,), [
        dict(lr_S=1e-2, freeze_ratio=None),                     # B never frozen, lr_B = lr
        dict(lr_S=1e-2, lr_B=3e-3, freeze_ratio=None),          # B never frozen, lr_B = 3 lr
        dict(method="lora-fa"),                                  # random frozen A, B trained at lr (reference)
        dict(lr_S=1e-2, init="random", freeze_ratio=None),      # LoRA-FA + S: random A, B = 0, never frozen
        dict(lr_S=1e-2, init="activations"),                    # activation subspace, default schedule
        dict(lr_S=1e-2, init="activations", freeze_ratio=None),
        dict(lr_S=1e-2, freeze_ratio=0.5), dict(lr_S=1e-2, freeze_ratio=0.7),  # a longer B phase
        dict(lr_S=1e-2, freeze_ratio=1.0)])
    # seeds 1, 2 only where a conclusion rests on it (lr_B = 3 lr collapsed; the freeze ratios did not help at seed 0)
    + _grid((100,), (1, 2), [dict(lr_S=1e-2, init="activations"), dict(lr_S=1e-2, freeze_ratio=None),
                             dict(method="lora-fa"), dict(lr_S=1e-2, init="random", freeze_ratio=None),
                             dict(lr_S=1e-2, init="activations", freeze_ratio=None)]),
    # 6. the winner at 400 steps (3 seeds), with LoRA and the spectral default (seed 0 of both ran in default_c/rule_b)
    "confirm400": _grid((400,), (0, 1, 2), [dict(lr_S=1e-2, init="activations"), dict(method="lora"),
                                            dict(lr_S=1e-2)]),
    # 7. the activation init across the 10x lr range (lr rule kept); at 400 steps both inits sit ~4 points under
    #    LoRA: is it the freezing of B there too?; the longer B phase with 3 seeds (in order of priority)
    "after": _grid((100,), (0,), [dict(lr=3e-4, lr_S=3e-3, init="activations"),
                                  dict(lr=3e-3, lr_S=3e-2, init="activations")])
    + _grid((400,), (0,), [dict(lr_S=1e-2, freeze_ratio=None)])
    + _grid((100,), (1, 2), [dict(lr_S=1e-2, freeze_ratio=0.7)])
    + _grid((400,), (0, 1, 2), [dict(lr_S=1e-2, freeze_ratio=0.7)]),  # (B never frozen at 400 steps: seed 0 only)
    # 8. the activation A carries 2-90x more of the input than the spectral one, so S's step moves the output more:
    #    is S's 10x multiplier (tuned on the spectral A) what makes lr 3e-3 collapse?
    "after2": _grid((100,), (0,), [dict(init="activations"), dict(lr=3e-3, init="activations")]),
    # 9. exploratory: the two best settings together (activation A, B frozen over the first 70%), seed 0
    "combined": _grid((100, 400), (0,), [dict(lr_S=1e-2, init="activations", freeze_ratio=0.7)])
    + _grid((400,), (1, 2), [dict(lr_S=1e-2, init="activations", freeze_ratio=0.7)]),
    # 10. (session 3) at 400 steps LaMDA underfits (train loss 0.35-0.39 against LoRA's 0.21, dev loss lower):
    #     the two rates not yet tried there (the head at 10x, S at 30x), then 4x the budget: does the gap close?
    "knobs400": _grid((400,), (0,), [dict(lr_S=1e-2, lr_head=1e-2), dict(lr_S=3e-2)]),
    #     capacity: after B freezes LaMDA trains r^2 numbers per module; at r = 32 (alpha 2r, as everywhere) that is
    #     16x more (still 9x fewer than LoRA r = 8 trains); LoRA at r = 32 for the same question on LoRA's side
    "rank32": _grid((400,), (0,), [dict(lr_S=1e-2, r=32, alpha="64"), dict(method="lora", r=32, alpha="64")]),
    #     LaMDA at r = 32 with the default rates does not learn (56.4, train loss 0.67) while LoRA r = 32 does (83.7):
    #     is S's 10x rate too large at that rank? (one lr for all; S at 3x)
    "rank32_rates": _grid((400,), (0,), [dict(r=32, alpha="64"), dict(lr_S=3e-3, r=32, alpha="64")]),
    #     which rule for S's rate across ranks: 10x at r = 8, then 10 * 8 / r (2.5x at 32) or 10 * sqrt(8 / r) (5x)?
    #     and does the 10x rule already fail at r = 16?
    "rank_rule": _grid((400,), (0,), [dict(lr_S=5e-3, r=32, alpha="64"), dict(lr_S=1e-2, r=16, alpha="32"),
                                      dict(lr_S=5e-3, r=16, alpha="32")]),
    #     the new default at r = 32 (lr_S = 10 lr * 8 / 32), 3 seeds: does a larger rank close the gap to LoRA r = 8?
    "rank32_default": _grid((400,), (0, 1, 2), [dict(lr_S=2.5e-3, r=32, alpha="64")]),
    "budget1600": _grid((1600,), (0,), [dict(lr_S=1e-2), dict(method="lora"), dict(lr_S=1e-2, freeze_ratio=0.7)]),
    # 11. (session 4) the schedule's other knob: which columns of B freeze first (3 seeds at 100 steps, where the
    #     schedule matters most); capacity again: r = 64 (S at 10 lr * 8 / 64), still fewer trainable numbers at the
    #     end (64^2 per module) than LoRA r = 8 trains
    "order": _grid((100,), (0, 1, 2), [dict(lr_S=1e-2, freeze_order="smallest_first")]),
    "rank64": _grid((400,), (0,), [dict(lr_S=1.25e-3, r=64, alpha="128")]),
    #     r = 64 with the rule's 1.25x ends with a higher training loss (0.43) than r = 32 (0.28): does the rule fall
    #     too fast beyond the ranks it was measured at? S at 2.5x (it never learned: loss 0.69 throughout, so 5x was
    #     dropped) and at half the rule, 0.625x
    "rank64_rates": _grid((400,), (0,), [dict(lr_S=2.5e-3, r=64, alpha="128"), dict(lr_S=6.25e-4, r=64, alpha="128")]),
    #     half the rule (0.625x) gave 81.1 at seed 0, the rule (1.25x) 77.2: two more seeds of both
    "rank64_seeds": _grid((400,), (1, 2), [dict(lr_S=6.25e-4, r=64, alpha="128"), dict(lr_S=1.25e-3, r=64, alpha="128")]),
    #     the knobs session 1 tried at 100 steps only (with the old rule), now at 400 steps with the default rates:
    #     no warmup, a longer warmup, rsLoRA scaling, S = 0 at init
    "knobs400b": _grid((400,), (0,), [dict(lr_S=1e-2, warmup=0.0), dict(lr_S=1e-2, warmup=0.2),
                                      dict(lr_S=1e-2, alpha="rs16"), dict(lr_S=1e-2, init="spectral_zero")]),
    # 12. (session 5) the two knobs that each helped at 400 steps, together: r = 32 (S at the rule's 2.5x) and
    #     B frozen over the first 70%: the best configuration faithful to the method?
    "best_faithful": _grid((400,), (0, 1, 2), [dict(lr_S=2.5e-3, r=32, alpha="64", freeze_ratio=0.7)]),
    # 13. (session 6) S at 5x lr instead of 10x: at 400 steps it lifted LaMDA and LaMDA++ on SST-2 and ended
    #     LaMDA++'s stall on STS-B (glue.md); does the short budget, where 10x was chosen, lose by it?
    "half_S": _grid((100,), (0, 1, 2), [dict(lr_S=5e-3)]),
    # 14. (session 8) the paper trains on full GLUE sets; every run above uses 2,000 rows. With 8x the rows (16,000)
    #     at 1600 steps (1.6 epochs, against 12.8 on 2,000 rows in budget1600), does LaMDA catch up with LoRA?
    #     LaMDA at the default 5x and, for the pair with budget1600, at 10x
    "data16k": _grid((1600,), (0,), [dict(method="lora", train_size=16000), dict(lr_S=5e-3, train_size=16000),
                                     dict(lr_S=1e-2, train_size=16000)])
    + _grid((1600,), (1,), [dict(method="lora", train_size=16000), dict(lr_S=5e-3, train_size=16000)]),
    # 16. (session 10) issue 24: the gradient init (A, B0 from the loss gradient's top-r subspaces) against the
    #     paper's spectral init, at S's default 10x here (the 400-step spectral runs above are at 10x, seeds 0-2),
    #     with and without a head warm-up (the head starts random), and with 16 / 256 calibration examples
    "gradient": _grid((100, 400), (0, 1, 2), [dict(lr_S=1e-2, init="gradient"),
                                               dict(lr_S=1e-2, init="gradient", head_warmup=20)])
    + _grid((100,), (0, 1, 2), [dict(lr_S=1e-2)])
    + _grid((400,), (0,), [dict(lr_S=1e-2, init="gradient", calibration=16),
                           dict(lr_S=1e-2, init="gradient", calibration=256)]),
    # 17. (session 10) the gradient subspace at S's library default (5x) and with B's longer window (freeze_ratio 0.7)
    "gradient2": _grid((400,), (0, 1, 2), [dict(lr_S=5e-3, init="gradient"),
                                           dict(lr_S=1e-2, init="gradient", freeze_ratio=0.7)]),
    # 19. (session 11) issue 24's ablation: LoRA-SB's subspace (the sign of one simulated Adam step), S0 from G's
    #     singular values, S's rate beyond 5x / 10x, B's window at 100 steps, the calibration size with seeds. At
    #     400 steps with B's longer window and S at 10x (the best gradient setting of session 10) unless marked
    "gradient3": _grid((400,), (0, 1, 2), [dict(lr_S=1e-2, init="gradient_sign", freeze_ratio=0.7),
                                           dict(lr_S=1e-2, init="gradient", s0="singular", freeze_ratio=0.7)])
    + _grid((100,), (0, 1, 2), [dict(lr_S=1e-2, init="gradient", freeze_ratio=0.7)])
    + _grid((400,), (0,), [dict(lr_S=2e-2, init="gradient", freeze_ratio=0.7),
                           dict(lr_S=5e-3, init="gradient", freeze_ratio=0.7),
                           # capacity with the task's subspace: r = 32 (S at the rank rule's 2.5x), as LoRA-SB
                           # reaches parity with a larger core
                           dict(lr_S=2.5e-3, r=32, alpha="64", init="gradient", freeze_ratio=0.7)])
    + _grid((400,), (1, 2), [dict(lr_S=1e-2, init="gradient", calibration=16)]),
    # 20. (session 11) the gradient subspace at r = 32 reached 82.7 at seed 0 (0.2 under LoRA): seeds 1 and 2
    "rank32_gradient": _grid((400,), (1, 2), [dict(lr_S=2.5e-3, r=32, alpha="64", init="gradient", freeze_ratio=0.7)]),
    # 18. (session 11) issue 24, item 6: today's defaults (spectral init, S at 5x) at 400 steps, 3 seeds, to pair with
    #     the 10x rows (plan confirm400) in this pipeline; glue.py found 5x better on every seed at 128 tokens
    "defaults400": _grid((400,), (0, 1, 2), [dict(lr_S=5e-3)]),
    # 21. (session 14) the sketch without a power iteration (2 calibration passes instead of 4; a median 96% of the
    #     top-16 energy against 99.9%, gradient_init_memory.md): does the weaker subspace cost accuracy? Paired with
    #     gradient2's freeze_ratio 0.7 row (q = 1, in the plan too: rerun with --log, it checks that row's seeds)
    "power0": _grid((400,), (0, 1, 2), [dict(lr_S=1e-2, init="gradient", freeze_ratio=0.7, power_iterations=0),
                                        dict(lr_S=1e-2, init="gradient", freeze_ratio=0.7)]),
    # 15. (session 10) weight decay: anchored at S0/B0S0 (issue 25) against the decay toward 0 it replaces, at the
    #     settings of the 400-step default-10x runs (weight decay 0 there: seeds 0-2)
    "weight_decay": _grid((400,), (0, 1, 2), [dict(lr_S=1e-2, weight_decay=0.1),
                                              dict(lr_S=1e-2, weight_decay=0.1, decay_anchor=False),
                                              dict(lr_S=1e-2, weight_decay=0.01)]),
}


# ------------------------------------------------------------------------------------------------ one run


@torch.no_grad()
def _use_minor_subspace(model) -> None:
    """Re-initialize every LaMDA layer on the r *smallest* singular directions (delta form: still exact at step 0)."""
    from lamda_peft import LamdaLayer
    from lamda_peft.tuners.delta import weight_as_out_in

    for layer in model.modules():
        if not isinstance(layer, LamdaLayer):
            continue
        for adapter in layer.lamda_S:
            r, s = layer.r[adapter], layer.scaling[adapter]
            U, S, Vh = torch.linalg.svd(weight_as_out_in(layer.get_base_layer()).float(), full_matrices=False)
            root = torch.sqrt(S[-r:] / s)
            layer.lamda_A[adapter].copy_(root[:, None] * Vh[-r:])
            layer.lamda_B[adapter].copy_(U[:, -r:] * root[None, :])
            layer.lamda_S[adapter].copy_(torch.eye(r))
            layer.lamda_B0S0[adapter].copy_(layer.lamda_B[adapter])


def _gradient_variant(model, batches: list[dict], c: dict) -> None:
    """init=gradient_sign and/or s0=singular (module docstring): the library's factors from another G or S0."""
    from lamda_peft import LamdaLayer
    from lamda_peft.tuners.lamda.gradient import gradient_top_svd
    from lamda_peft.tuners.delta import weight_as_out_in
    from lamda_peft.tuners.lamda.initialize import gradient_factors

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    if c["init"] == "gradient_sign":  # each module's full gradient, as LoRA-GA takes it (eval mode, no dropout)
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        weights = {n: layer.get_base_layer().weight for n, layer in layers.items()}
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                model(**batch).loss.backward()
        svd = {}
        for n, w in weights.items():
            step = (w.grad / (w.grad.abs() + 1e-8)).double()  # one Adam step from zero state, bias-corrected
            U, sigma, Vh = torch.linalg.svd(step, full_matrices=False)
            svd[n] = (U[:, :c["r"]], sigma[:c["r"]], Vh[:c["r"]])
            w.grad = None
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag
    else:
        found = gradient_top_svd(model, layers, batches, {n: c["r"] for n in layers}, seed=c["seed"])
        svd = {n: (f.U, f.S, f.Vh) for n, f in found.items()}
    with torch.no_grad():
        for n, layer in layers.items():
            U, sigma, Vh = svd[n]
            factors = gradient_factors(U, Vh, weight_as_out_in(layer.get_base_layer()), layer.scaling["default"])
            if c["s0"] == "singular":
                S0 = torch.diag(sigma.double() / sigma.double().mean())
                factors["lamda_S"], factors["lamda_B0S0"] = S0, factors["lamda_B"] @ S0
            for container, value in factors.items():
                getattr(layer, container)["default"].copy_(value)
            layer.awaiting_calibration.discard("default")


def one_run(c: dict, data) -> dict:
    from peft import TaskType, get_peft_model
    from transformers import Trainer, TrainingArguments

    from lamda_peft import LamdaCallback

    train, select, dev = data
    spec = infer_spec(train, dev, **TASKS["SST-2"][1], max_length=64)
    torch.manual_seed(c["seed"])
    model, tokenizer = load_base(minilm_path(), spec.task, 2)
    model = get_peft_model(model, lamda_config(c, TaskType.SEQ_CLS))
    if c["subspace"] == "minor":
        _use_minor_subspace(model)
    if c["init"] in ("activations", "gradient", "gradient_sign"):  # seeded batches of 16 sentences (with labels)
        batches = calibration_batches(spec.encode(train, tokenizer), collator_for(spec, tokenizer), c["seed"],
                                      num_batches=max(1, c["calibration"] // 16))
        if c["init"] == "activations":
            initialize_from_activations(model, batches, num_batches=len(batches))
        elif c["init"] == "gradient_sign" or c["s0"] != "identity":
            if c["head_warmup"] or c["power_iterations"] != DEFAULTS["power_iterations"]:
                raise ValueError("the ablation's gradient variants take the full G: no head warm-up, no sketch")
            _gradient_variant(model, batches, c)
        else:
            lamda_peft.initialize(model, batches, num_batches=len(batches), head_warmup_steps=c["head_warmup"],
                                  head_lr=c["lr_head"] or c["lr"], power_iterations=c["power_iterations"],
                                  seed=c["seed"])
    # None = lr: the ablation's baseline is one lr for everything (the library's default multipliers may differ)
    groups = lamda_param_groups(model, c["lr"], weight_decay=c["weight_decay"],
                                **{k: c[k] or c["lr"] for k in ("lr_S", "lr_B", "lr_head")})
    optimizer = torch.optim.AdamW(groups, lr=c["lr"], weight_decay=c["weight_decay"])
    if not c["decay_anchor"]:  # the decay toward 0 of before issue 25: no anchoring hooks from attach_freezing
        from lamda_peft import freezing

        freezing.anchor_weight_decay = lambda model, optimizer: None
    steps = c["steps"]
    args = TrainingArguments(
        output_dir="/tmp/lamda-ablation", per_device_train_batch_size=16, learning_rate=c["lr"], max_steps=steps,
        warmup_steps=int(c["warmup"] * steps), weight_decay=0.0, logging_steps=max(1, steps // 20),
        eval_strategy="no", save_strategy="no", report_to="none", seed=c["seed"], data_seed=c["seed"], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    freezes = c["method"] in ("lamda", "lamda++") and c["freeze_ratio"] is not None
    callbacks = [LamdaCallback()] if freezes else []
    trainer = Trainer(model=model, args=args, train_dataset=spec.encode(train, tokenizer),
                      data_collator=collator_for(spec, tokenizer), optimizers=(optimizer, None), callbacks=callbacks)
    began = time.time()
    trainer.train()
    losses = training_losses(trainer)
    return {**c, "groups": describe_groups(groups), "train_seconds": round(time.time() - began, 1),
            "train_loss": losses,
            "dev": evaluate(model, tokenizer, spec, spec.encode(dev, tokenizer), 64), "provenance": provenance()}


# ------------------------------------------------------------------------------------------------ log and report


def read_log(log: Path = LOG) -> list[dict]:
    # runs logged before a knob existed ran at its default (e.g. r = 8)
    return [{**DEFAULTS, **json.loads(line)} for line in log.read_text().splitlines() if line.strip()] \
        if log.exists() else []


def append(run: dict, log: Path = LOG) -> None:
    with log.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(run) + "\n")
        fcntl.flock(fh, fcntl.LOCK_UN)


def label(c: dict) -> str:
    diff = [f"{k}={c[k]}" for k in DEFAULTS if k not in ("steps", "seed", "method") and c[k] != DEFAULTS[k]]
    if diff:
        return c["method"] + " " + ", ".join(diff)
    return c["method"] + (" (one lr 1e-3 for all: the pre-issue default)" if c["method"].startswith("lamda") else " lr=0.001")


def report(runs: list[dict], log: Path = LOG) -> str:
    """Dev accuracy per (settings, steps): mean ± std over seeds, with the number of seeds; then, per budget, the
    difference to LoRA (lr 1e-3) paired by seed, over the seeds both have (2 or more). The table and the plot go
    beside the log: <stem>_table.md and <stem>.png for <stem>_runs.jsonl."""
    table: dict[str, dict[int, list[float]]] = {}
    by_seed: dict[tuple[str, int], dict[int, float]] = {}
    for run in runs:
        acc = 100 * run["dev"]["accuracy"]
        table.setdefault(label(run), {}).setdefault(run["steps"], []).append(acc)
        by_seed.setdefault((label(run), run["steps"]), {})[run["seed"]] = acc
    budgets = sorted({run["steps"] for run in runs})
    lines = ["| settings (differences from: lr 1e-3 for every group, freeze_ratio 0.3, warmup 6%, alpha 16, "
             "spectral init, top-r subspace) | " + " | ".join(f"{t} steps" for t in budgets)
             + " | " + " | ".join(f"{t} steps, minus LoRA (paired)" for t in budgets) + " |",
             "|---|" + "---|" * 2 * len(budgets)]
    reference = {label(run): label(cell(method="lora", train_size=run["train_size"])) for run in runs}
    for name, by_steps in table.items():
        lora = reference[name]  # LoRA lr 1e-3 on the same training rows
        cells = []
        for t in budgets:
            acc = by_steps.get(t)
            cells.append("-" if not acc else f"{np.mean(acc):.1f}" + (f" ± {np.std(acc):.1f}" if len(acc) > 1 else "")
                         + f" ({len(acc)} seed{'s' if len(acc) > 1 else ''})")
        for t in budgets:
            mine, ref = by_seed.get((name, t), {}), by_seed.get((lora, t), {})
            diff = [mine[s] - ref[s] for s in sorted(set(mine) & set(ref))]
            cells.append(f"{np.mean(diff):+.1f} ± {np.std(diff):.1f} ({len(diff)})" if len(diff) > 1 and name != lora
                         else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    stem = log.name.removesuffix(".jsonl").removesuffix("_runs")
    (log.parent / f"{stem}_table.md").write_text(text)
    _plot(table, budgets, log.parent / f"{stem}.png")
    return text


def _plot(table: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(names) + 1.5))
    height = 0.8 / max(len(budgets), 1)
    for j, t in enumerate(budgets):
        y = np.arange(len(names)) + j * height
        means = [np.mean(table[n][t]) if t in table[n] else 0 for n in names]
        errs = [np.std(table[n][t]) if t in table[n] else 0 for n in names]
        ax.barh(y, means, height, xerr=errs, label=f"{t} steps", color=f"C{j}")
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize=7)
    ax.axvline(50.9, color="grey", ls=":", lw=1, label="majority class")
    budget = RESULTS / "glue_budget_runs.jsonl"  # the same split, benchmarks/glue.py: LoRA's 100-step runs
    lora = [json.loads(line) for line in budget.read_text().splitlines()] if budget.exists() else []
    lora = [100 * r["dev"]["accuracy"] for r in lora if (r["task"], r["method"], r["lr"]) == ("SST-2", "lora", 1e-3)
            and r["steps"] == 100]
    if lora:
        ax.axvline(float(np.mean(lora)), color="black", ls="--", lw=1, label="LoRA lr 1e-3, 100 steps (glue.py)")
    ax.set_xlim(45, 90), ax.set_xlabel("SST-2 dev accuracy (x100)"), ax.invert_yaxis(), ax.legend(fontsize=7)
    ax.set_title("LaMDA ablation, MiniLM r=8 all-linear, 2,000 training rows unless marked")
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", nargs="+", default=[], choices=list(PLANS))
    p.add_argument("--shard", default="1/1", help="i/n: run every n-th cell starting at the i-th (two processes)")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from the log")
    p.add_argument("--step-sizes", action="store_true", help="only measure one Adam step per role (seconds)")
    p.add_argument("--subspace-energy", action="store_true",
                   help="only measure the input energy in span(A), spectral vs activation init (seconds)")
    p.add_argument("--rank", type=int, default=R, help="the rank of the --step-sizes probe (alpha = 2 rank)")
    p.add_argument("--log", type=Path, default=LOG, help="the run log to read and append to (default: the committed "
                   "docs/results/lamda_ablation_runs.jsonl); the table and plot are written beside it")
    opts = p.parse_args()
    if opts.step_sizes or opts.subspace_energy:  # the probes behind the diagnosis (lamda_probes.py)
        import lamda_probes

        print(json.dumps(lamda_probes.step_sizes(r=opts.rank) if opts.step_sizes else lamda_probes.subspace_energy(), indent=1))
        return
    i, n = (int(x) for x in opts.shard.split("/"))
    if not opts.report:
        cells = [c for plan in opts.plan for c in PLANS[plan]][i - 1::n]
        for c in cells:
            if key(c) in {key(r) for r in read_log(opts.log)}:
                continue
            run = one_run(c, split("SST-2", c["train_size"], 300))
            append(run, opts.log)
            print(f"{label(c)}, {c['steps']} steps, seed {c['seed']}: dev {100 * run['dev']['accuracy']:.1f} "
                  f"({run['train_seconds']:.0f} s)", flush=True)
    print(report(read_log(opts.log), opts.log))


if __name__ == "__main__":
    main()
