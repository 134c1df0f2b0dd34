"""Spectral decomposition of pretrained weights: the SVD (exact or seeded randomized) and the spectral init.

All decompositions run in float32 whatever the weight's dtype (method.md 3.1). Shapes follow PyTorch:
a weight is ``(d_out, d_in)`` and a layer computes ``y = x W^T``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch

from .eigensolver import decompose_many, single_threaded
from .eigensolver import exact_top_svd as _exact_top_svd

SvdMethod = Literal["exact", "randomized"]


@dataclass(frozen=True)
class TopSVD:
    """The top-r singular triplets of a weight: ``W ~= U diag(S) Vh``.

    U: (d_out, r), S: (r,) descending, Vh: (r, d_in); all float32. ``total_energy`` is ``||W||_F^2``, so the
    normalized energy of the top k values (LaMDA++) needs only these k values.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    total_energy: float

    def energy(self, k: int) -> float:
        """E(k) = sum_{i<=k} sigma_i^2 / ||W||_F^2 (method.md 3.3)."""
        if self.total_energy == 0.0:
            return 1.0
        return float(self.S[:k].double().square().sum() / self.total_energy)


def top_svd(
    weight: torch.Tensor,
    r: int,
    *,
    method: SvdMethod = "exact",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    name: str = "weight",
) -> TopSVD:
    """Top-``r`` SVD of ``weight`` (d_out, d_in) in float32.

    ``method="randomized"`` is Halko et al.'s range finder with ``niter`` power iterations and an explicit
    ``torch.Generator`` seeded with ``seed``: the same call gives the same factors, whatever the global RNG.
    """
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if not 1 <= r <= min(d_out, d_in):
        raise ValueError(
            f"{name}: rank r={r} is not in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] for a weight of shape "
            f"{tuple(weight.shape)}; lower r, or set a smaller rank for this module with rank_pattern."
        )
    w = weight.detach().to(torch.float32)
    # ||W||_F in float64 in one pass, without a float64 copy of W; it is NaN or Inf exactly when W holds NaN or Inf.
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError(
            f"{name}: the weight holds NaN or Inf values, so it has no SVD; check the checkpoint, or exclude this "
            "module with exclude_modules."
        )
    if method not in ("exact", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; use 'exact' or 'randomized'")
    total_energy = norm * norm
    # Small decompositions run on one thread (see eigensolver.py: threads stall on a busy CPU); top_svds runs several.
    bounded = w.device.type == "cpu" and torch.get_num_threads() > 1
    with single_threaded() if bounded else contextlib.nullcontext():
        if method == "exact":
            U, S, Vh = _exact_top_svd(w, r)
        else:
            U, S, Vh = _randomized_svd(w, r, niter=niter, oversample=oversample, seed=seed)
    return TopSVD(U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(), total_energy)


def _randomized_svd(w: torch.Tensor, r: int, *, niter: int, oversample: int, seed: int):
    d_out, d_in = w.shape
    k = min(r + oversample, d_out, d_in)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(d_in, k, generator=gen, device=w.device, dtype=w.dtype)
    q, _ = torch.linalg.qr(w @ omega)
    for _ in range(niter):  # subspace iteration, re-orthonormalized for stability
        q, _ = torch.linalg.qr(w.T @ q)
        q, _ = torch.linalg.qr(w @ q)
    u_small, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u_small, s, vh


def top_svds(
    weights: Mapping[str, torch.Tensor],
    r: Union[int, Mapping[str, int]],
    *,
    method: SvdMethod = "exact",
    niter: int = 4,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> dict[str, TopSVD]:
    """``top_svd`` of every (d_out, d_in) weight, with rank ``r`` or ``r[name]``: several at once, one per core, each
    on one thread (eigensolver.decompose_many), with a progress bar (module i of N) on a terminal.

    The result of each is the same as a single ``top_svd`` call with the same arguments.
    """
    def one(name: str, weight: torch.Tensor) -> TopSVD:
        rank = r if isinstance(r, int) else r[name]
        return top_svd(weight, rank, method=method, niter=niter, seed=seed, name=name)

    return decompose_many(weights, one, desc="spectral init", progress=progress)


@dataclass(frozen=True)
class SpectralFactors:
    """A (r, d_in) and B0 (d_out, r) with ``scaling * B0 @ A`` equal to the top-r part of W (method.md 3.1)."""

    A: torch.Tensor
    B0: torch.Tensor


def spectral_factors(svd: TopSVD, scaling: float) -> SpectralFactors:
    """A = diag(sqrt(sigma/s)) V_r^T and B0 = U_r diag(sqrt(sigma/s)), PiSSA's split, so s*B0@A = U_r S_r V_r^T."""
    root = torch.sqrt(svd.S / scaling)
    return SpectralFactors(A=root[:, None] * svd.Vh, B0=svd.U * root[None, :])


def kaiming_uniform_factor(r: int, d_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random (r, d_in) factor with PEFT LoRA's init of A (Kaiming-uniform, a=sqrt(5))."""
    bound = 1.0 / math.sqrt(d_in)  # what kaiming_uniform_(a=sqrt(5)) gives for fan_in = d_in
    return (torch.rand(r, d_in, generator=generator) * 2.0 - 1.0) * bound
