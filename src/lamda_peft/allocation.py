"""LaMDA++: per-module ranks from the normalized spectral energy of the pretrained weights (method.md 3.3).

For a module ``l`` with singular values ``sigma_{l,1} >= sigma_{l,2} >= ...`` the energy captured at rank r is

    E_l(r) = sum_{i<=r} sigma_{l,i}^2 / ||W_l||_F^2            (E_l(0) = 0, nondecreasing, E_l(rank W_l) = 1)

so only the top ``r_max`` singular values and the Frobenius norm are needed. ``allocate_ranks`` distributes a
budget ``R = sum_l r_l`` greedily: every module starts at ``r_min``; each remaining unit goes to the module with the
lowest current ``E_l(r_l)`` among those still below ``r_max`` (ties: the first module in order). Since every
``E_l`` is nondecreasing, raising the current minimum is never worse, so the result maximizes the smallest captured
energy ``min_l E_l(r_l)`` under the budget and the bounds; it is deterministic and keeps the budget exactly.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .eigensolver import decompose_many
from .spectral import SvdMethod, TopSVD, top_svd, top_svds
from .tuners.delta import weight_as_out_in


def energy_curve(singular_values: torch.Tensor, total_energy: float, r_max: int) -> list[float]:
    """[E(0), E(1), ..., E(r_max)] of one module from its top singular values (descending) and ``||W||_F^2``.

    Float64 cumulative sums, so identical spectra give identical curves (exact ties stay ties).
    """
    if r_max > singular_values.numel():
        raise ValueError(f"{singular_values.numel()} singular values given, fewer than r_max={r_max}")
    if total_energy == 0.0:  # a zero weight: nothing to capture, every rank is as good
        return [0.0] + [1.0] * r_max
    cumulative = singular_values[:r_max].double().square().cumsum(0) / total_energy
    return [0.0] + cumulative.tolist()


def check_allocation_bounds(
    names: Sequence[str], max_ranks: Sequence[int], budget: int, r_min: int, r_max: int
) -> None:
    """Raise ValueError, naming the fix, when ``budget`` cannot be met within ``[r_min, r_max]`` on these modules.

    ``max_ranks[l]`` is ``min(d_in, d_out)`` of module ``l``: no rank can exceed it.
    """
    count = len(names)
    if count == 0:
        raise ValueError("no module to allocate ranks to; check target_modules")
    if not 1 <= r_min <= r_max:
        raise ValueError(f"rank bounds need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    for name, limit in zip(names, max_ranks):
        if r_max > limit:
            raise ValueError(
                f"r_max={r_max} exceeds min(d_in, d_out)={limit} of module {name!r}; set r_max <= {limit} "
                "(or a smaller r, since r_max defaults to 2r), or exclude that module with exclude_modules."
            )
    if not r_min * count <= budget <= r_max * count:
        raise ValueError(
            f"the rank budget {budget} cannot be met by {count} modules with ranks in [{r_min}, {r_max}]: it must lie "
            f"in [{r_min * count}, {r_max * count}]; change rank_budget, r_min or r_max."
        )


def allocate_ranks(
    curves: Sequence[Sequence[float]],
    budget: int,
    r_min: int,
    r_max: int,
    names: Optional[Sequence[str]] = None,
) -> list[int]:
    """The greedy max-min allocation of method.md 3.3.

    curves[l][k] = E_l(k) for k = 0..r_max (see ``energy_curve``); returns ranks r_l with sum(r_l) == budget and
    r_min <= r_l <= r_max, in the order of ``curves``.
    """
    names = list(names) if names is not None else [f"module {i}" for i in range(len(curves))]
    # A curve of length k+1 means the module has at most k singular values.
    check_allocation_bounds(names, [len(curve) - 1 for curve in curves], budget, r_min, r_max)
    ranks = [r_min] * len(curves)
    # Heap of (E_l(r_l), l) over modules still below r_max: popping gives the lowest energy, then the lowest index.
    heap = [(curves[l][r_min], l) for l in range(len(curves)) if r_min < r_max]
    heapq.heapify(heap)
    for _ in range(budget - r_min * len(curves)):
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        if ranks[l] < r_max:
            heapq.heappush(heap, (curves[l][ranks[l]], l))
    return ranks


def energy_curves(
    weights: Mapping[str, torch.Tensor],
    r_max: int,
    *,
    method: SvdMethod = "exact",
    niter: int = 4,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> dict[str, list[float]]:
    """{module: [E(0), ..., E(r_max)]} when only the scores are needed (no init): the exact path computes
    singular values only (``torch.linalg.svdvals``, the reference of method.md 3.3), not the vectors."""
    def curve(name: str, weight: torch.Tensor) -> list[float]:
        if method == "exact":
            w = weight.detach().float()
            return energy_curve(torch.linalg.svdvals(w), float(w.double().square().sum()), r_max)
        svd = top_svd(weight, r_max, method=method, niter=niter, seed=seed, name=name)
        return energy_curve(svd.S, svd.total_energy, r_max)

    return decompose_many(weights, curve, desc=f"singular values ({method}, top {r_max})", progress=progress)


def energy_allocation(curves: Mapping[str, Sequence[float]], budget: int, r_min: int, r_max: int) -> dict[str, int]:
    """{module: r_l} from each module's energy curve E(0..r_max) (``allocate_ranks``, keyed by module name)."""
    names = list(curves)
    return dict(zip(names, allocate_ranks([curves[name] for name in names], budget, r_min, r_max, names)))


def truncate(svd: TopSVD, r: int) -> TopSVD:
    """The top-r triplets of a top-k decomposition (k >= r): for an exact SVD this *is* the top-r SVD."""
    return replace(svd, U=svd.U[:, :r].contiguous(), S=svd.S[:r].contiguous(), Vh=svd.Vh[:r].contiguous())


def rank_pattern_key(module_name: str) -> str:
    """A rank_pattern key matching exactly this module (PEFT matches keys as regexes ending the module name)."""
    return f"^{re.escape(module_name)}$"


def allocate_energy_ranks(config: Any, modules: Mapping[str, nn.Module]) -> dict[str, TopSVD]:
    """LaMDA++ at injection: fill ``config.rank_pattern`` from the spectra of the targeted ``modules``.

    ``config`` is a LamdaConfig with ``rank_allocation="energy"``; ``modules`` maps each targeted module name to its
    base Linear/Conv1D, in model order. A non-empty ``rank_pattern`` is a finished allocation (saved with the
    adapter and reloaded): it is used as is, without decomposing anything, but it must name every module.
    Otherwise each weight is decomposed once (top r_max triplets, ``config.svd_method``), the ranks are allocated,
    ``rank_pattern``, ``r_min``, ``r_max`` and ``rank_budget`` are written to the config, and the returned
    {module: top-r_l decomposition} lets the spectral init reuse the same SVD (empty for ``init="random"``).
    """
    names = list(modules)
    if config.rank_pattern:
        missing = [name for name in names if rank_pattern_key(name) not in config.rank_pattern]
        if missing:
            raise ValueError(
                f"rank_allocation='energy' with a rank_pattern that does not name {len(missing)} targeted module(s), "
                f"e.g. {missing[0]!r}. LaMDA++ fills rank_pattern itself (it is read back as a saved allocation, and a "
                "config already given to get_peft_model holds that model's allocation): leave rank_pattern empty to "
                "compute the ranks (a fresh LamdaConfig for another model), or use rank_allocation='uniform' with your "
                "own pattern."
            )
        return {}
    r_min, r_max = config.rank_bounds
    budget = config.rank_budget if config.rank_budget is not None else config.r * len(names)
    weights = {}
    for name, module in modules.items():
        weight = weight_as_out_in(module)
        if weight.device.type == "meta":
            raise ValueError(
                f"LaMDA++ needs the pretrained weights to choose ranks, but {name!r} is on the meta device; load the "
                "model with its weights, or load a saved adapter (its config holds the ranks)."
            )
        weights[name] = weight
    check_allocation_bounds(names, [min(w.shape) for w in weights.values()], budget, r_min, r_max)  # before any SVD
    spectra = top_svds(weights, r_max, method=config.svd_method, niter=config.svd_niter, seed=config.svd_seed)
    ranks = energy_allocation({n: energy_curve(svd.S, svd.total_energy, r_max) for n, svd in spectra.items()},
                              budget, r_min, r_max)
    config.rank_pattern = {rank_pattern_key(name): r for name, r in ranks.items()}
    config.r_min, config.r_max, config.rank_budget = r_min, r_max, budget
    if config.init == "random":
        return {}
    return {name: truncate(spectra[name], r) for name, r in ranks.items()}


@dataclass(frozen=True)
class LamdaParameterCounts:
    """Trainable adapter parameters of LaMDA (method.md 3): ``r^2 + r d_out`` per module while B trains, ``r^2``
    once B is frozen. With per-module ranks (LaMDA++) the sums use each module's own ``r_l``."""

    while_b_trains: int
    after_b_frozen: int
    ranks: dict[str, int]


def lamda_parameter_counts(model: nn.Module, adapter_name: str = "default") -> LamdaParameterCounts:
    """Count the adapter's trainable parameters from each ``LamdaLayer``'s own rank (walks modules by type)."""
    from .tuners.lamda.layer import LamdaLayer  # local import: the tuner imports this module

    ranks: dict[str, int] = {}
    training = frozen = 0
    for name, module in model.named_modules():
        if isinstance(module, LamdaLayer) and adapter_name in module.r:
            r = module.r[adapter_name]
            ranks[name] = r
            training += r * r + r * module.out_features
            frozen += r * r
    if not ranks:
        raise ValueError(f"no LaMDA layer holds adapter {adapter_name!r}; check the adapter name")
    return LamdaParameterCounts(while_b_trains=training, after_b_frozen=frozen, ranks=ranks)
