"""``lamda-peft spectrum MODEL``: the LaMDA++ view of a model (method.md 3.3, the paper's Figure 3).

For every targeted Linear/Conv1D module: its shape, the normalized energy E(r) captured by its top ``--rank``
singular values, the rank LaMDA++ gives it (budget ``rank x modules``, bounds ``[rank/2, 2 rank]`` unless set) and
E at that rank. Writes ``spectrum.csv``, ``spectrum.md`` and ``spectrum.png`` (E(r) per module type across layers,
and the allocated ranks) to ``--output-dir``. The model is loaded on the CPU in float32 with ``AutoModel``.
"""

from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..allocation import check_allocation_bounds, energy_allocation, energy_curves
from ..tuners.base_model import find_target_modules
from ..tuners.delta import weight_as_out_in
from ..tuners.lamda.config import LamdaConfig
from . import UsageError
from .spectrum_args import CSV_NAME, MD_NAME, PNG_NAME, check_args
from .spectrum_args import add_parser as _add_parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``spectrum`` subcommand (its options and checks are in ``spectrum_args``, which ``lamda-peft`` imports)."""
    _add_parser(subparsers)


@dataclass(frozen=True)
class Row:
    module: str
    d_out: int
    d_in: int
    energy_at_rank: float
    allocated_rank: int
    energy_at_allocated: float

    @property
    def layer(self) -> Optional[int]:
        """The first numeric name component (the layer index), or None for modules outside the layer stack."""
        match = _LAYER.search(self.module)
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        """The module type: the name after the layer index (self_attn.q_proj, attention.output.dense, ...)."""
        match = _LAYER.search(self.module)
        return self.module[match.end():] if match else self.module


_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def parse_targets(value: str) -> Union[str, list[str]]:
    """'all-linear' as is; plain names separated by commas as a list; anything else as a regex (PEFT semantics)."""
    if value.lower() == "all-linear" or not re.fullmatch(r"[\w.]+(,[\w.]+)*", value):
        return value
    return value.split(",")


def spectrum_rows(model: nn.Module, rank: int, targets: Union[str, list[str]] = "all-linear", *, svd: str = "exact",
                  r_min: Optional[int] = None, r_max: Optional[int] = None, budget: Optional[int] = None,
                  progress: bool = False) -> list[Row]:
    """Decompose each targeted weight once (top r_max), allocate LaMDA++ ranks, and tabulate (model order)."""
    config = LamdaConfig(r=rank, target_modules=targets, rank_allocation="energy", r_min=r_min, r_max=r_max,
                         rank_budget=budget, svd_method=svd)
    modules = find_target_modules(model, config)
    if not modules:
        raise ValueError(f"no Linear/Conv1D module matches targets={targets!r}; check the module names")
    weights = {name: weight_as_out_in(module) for name, module in modules.items()}
    low, high = config.rank_bounds
    total = budget if budget is not None else rank * len(weights)
    limits = [min(w.shape) for w in weights.values()]
    for name, limit in zip(weights, limits):
        if rank > limit:
            raise ValueError(f"--rank {rank} exceeds min(d_in, d_out)={limit} of module {name!r}; use a smaller --rank")
    check_allocation_bounds(list(weights), limits, total, low, high)
    curves = energy_curves(weights, max(high, rank), method=svd, progress=progress)
    ranks = energy_allocation({name: curve[: high + 1] for name, curve in curves.items()}, total, low, high)
    return [
        Row(name, *weights[name].shape, curves[name][rank], ranks[name], curves[name][ranks[name]])
        for name in weights
    ]


def write_table(rows: list[Row], rank: int, folder: Path) -> None:
    header = ["module", "type", "layer", "d_out", "d_in", f"E({rank})", "allocated_rank", "E(allocated)"]
    with open(folder / CSV_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.module, row.kind, "" if row.layer is None else row.layer, row.d_out, row.d_in,
                             f"{row.energy_at_rank:.6f}", row.allocated_rank, f"{row.energy_at_allocated:.6f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(f"| {row.module} | {row.kind} | {'' if row.layer is None else row.layer} | {row.d_out} | "
                     f"{row.d_in} | {row.energy_at_rank:.4f} | {row.allocated_rank} | {row.energy_at_allocated:.4f} |")
    (folder / MD_NAME).write_text("\n".join(lines) + "\n")


def plot(rows: list[Row], rank: int, path: Path, title: str) -> None:
    """Left: E(rank) per module type across layers (Figure 3 of the paper). Right: the LaMDA++ ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(row.kind for row in rows if row.layer is not None))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in kinds:
        points = sorted((row for row in rows if row.kind == kind and row.layer is not None), key=lambda row: row.layer)
        layers = [row.layer for row in points]
        left.plot(layers, [row.energy_at_rank for row in points], marker="o", markersize=3, label=kind)
        right.plot(layers, [row.allocated_rank for row in points], marker="o", markersize=3, label=kind)
    left.set(xlabel="layer", ylabel=f"E({rank})", title=f"energy of the top {rank} singular values")
    right.axhline(rank, color="grey", linestyle=":", linewidth=1)
    right.set(xlabel="layer", ylabel="rank", title=f"LaMDA++ ranks (budget {sum(r.allocated_rank for r in rows)})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parameter_figures(rows: list[Row], ranks: list[int]) -> tuple[int, int]:
    """LaMDA trainable parameters: (sum r^2 + r d_out while B trains, sum r^2 once B is frozen)."""
    return (sum(r * r + r * row.d_out for r, row in zip(ranks, rows)), sum(r * r for r in ranks))


def print_report(rows: list[Row], rank: int) -> None:
    width = max(len(row.module) for row in rows)
    print(f"{'module':<{width}}  {'shape':>11}  {f'E({rank})':>8}  {'rank':>4}  {'E(rank)':>8}")
    for row in rows:
        shape = f"{row.d_out}x{row.d_in}"
        print(f"{row.module:<{width}}  {shape:>11}  {row.energy_at_rank:8.4f}  {row.allocated_rank:4d}  "
              f"{row.energy_at_allocated:8.4f}")
    uniform = parameter_figures(rows, [rank] * len(rows))
    allocated = parameter_figures(rows, [row.allocated_rank for row in rows])
    print(f"\n{len(rows)} modules, rank budget {sum(row.allocated_rank for row in rows)}")
    print(f"min E: uniform r={rank} {min(r.energy_at_rank for r in rows):.4f}, "
          f"LaMDA++ {min(r.energy_at_allocated for r in rows):.4f}")
    print(f"LaMDA trainable parameters while B trains / after B is frozen: uniform {uniform[0]:,} / {uniform[1]:,}, "
          f"LaMDA++ {allocated[0]:,} / {allocated[1]:,}")


def load_model(name: str) -> nn.Module:
    from transformers import AutoModel

    from .model_path import resolve_model_path  # shared by every subcommand: aliases, missing folders, Hub ids

    path = resolve_model_path(name)
    try:
        return AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the weights of model {name!r} ({str(err).splitlines()[0]}); give a folder "
                         "with config.json and weights, a Hub id, or an alias (minilm, smollm2)") from None


def run(args: argparse.Namespace) -> int:
    check_args(args)
    model = load_model(args.model)
    try:
        rows = spectrum_rows(model, args.rank, parse_targets(args.targets), svd=args.svd, r_min=args.r_min,
                             r_max=args.r_max, budget=args.budget, progress=True)
    except ValueError as err:
        raise UsageError(str(err)) from None
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print_report(rows, args.rank)
    write_table(rows, args.rank, folder)
    plot(rows, args.rank, folder / PNG_NAME, f"{args.model}: {len(rows)} modules, {args.svd} SVD")
    print(f"\nwrote {folder / CSV_NAME}, {folder / MD_NAME} and {folder / PNG_NAME}")
    return 0
