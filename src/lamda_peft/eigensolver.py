"""The exact top-r SVD of a weight, fast and robust on a busy machine, with no dependency beyond PyTorch.

Method: the eigendecomposition of the smaller Gram matrix (``W W^T`` or ``W^T W``, n x n with n = min(d_out, d_in)),
of which only the top r eigenpairs are kept:

    W^T W = V diag(sigma^2) V^T          ->  U = W V diag(1/sigma)          (tall W: d_out >= d_in)
    W W^T = U diag(sigma^2) U^T          ->  V^T = diag(1/sigma) U^T W       (wide W)

Solvers, by what is installed (``top_eigenpairs``):

- **PyTorch (always there).** ``torch.linalg.eigh`` computes all n eigenpairs. This is the path of a core install
  (``pip install lamda-peft``: SciPy is *not* a dependency), of a SciPy built against MKL, of conda's SciPy, and of
  GPU weights.
- **LAPACK's subset solver, when SciPy's PyPI wheel is installed.** ``?syevr`` reduces the matrix to tridiagonal form
  once and finds only the r eigenvectors wanted; it is taken from the OpenBLAS that SciPy's wheels bundle
  (``scipy.libs/libscipy_openblas-*.so``, found without importing SciPy) and called through ctypes, which releases
  the GIL so that several weights are decomposed side by side. That layout is private to SciPy's wheels, so it is
  probed defensively: any other layout (no such library, a missing symbol, an ILP64 build) falls back to PyTorch.

Why keep the second path, and why not declare SciPy a core dependency: per decomposition the subset solver is about
1.8x faster than the full ``eigh`` on one thread (576 x 576, r = 16: 9 vs 18 ms; 4096 x 4096, a 7B model's Gram
matrix: 2.75 vs 4.95 s, i.e. about 4 minutes saved over LLaMA-2-7B's 224 modules on 2 cores). On SmolLM2's whole
``get_peft_model`` (LaMDA++, 210 modules) the PyTorch path takes 1.24x as long idle and 1.35x under load
(docs/results/init_under_load.md, ``benchmarks/init_under_load.py --variants now torch``). That gain is worth a
guarded fast path, not a 40 MB required dependency: a user without SciPy gets the same factors (both solvers are
exact; the tests compare each against a float64 SVD) at the PyTorch speed. SciPy's own ``eigh`` wrapper is never used: it holds the GIL (no side-by-side decompositions) and would need
threadpoolctl to keep its BLAS on one thread.

Threads: a transformer weight's Gram matrix is small (a few hundred to a few thousand rows), so a parallel LAPACK or
BLAS call gains little, and when other processes keep the cores busy its OpenMP threads wait for each other at every
barrier: one ``eigh`` of a 576 x 576 matrix went from 0.14 s to 1.7 s, and ``get_peft_model`` on MiniLM from 0.3 s
to 176 s. Each decomposition therefore runs on one thread (:func:`single_threaded`: PyTorch's pool, and the bundled
OpenBLAS where it is used), and :func:`decompose_many` decomposes several weights side by side, one per core, which
is both faster on an idle machine and immune to the stall on a loaded one.

Precision: the Gram matrix is decomposed in float32 when sigma_r >= 0.05 sigma_1 (the common case; on SmolLM2 the
top-r part then agrees with a float64 SVD to 2e-6 relative), else in float64; if sigma_r is not separated from zero
(a rank-deficient weight), the plain SVD is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, TypeVar

import torch
from tqdm.auto import tqdm

# Below this ratio sigma_r / sigma_1 the Gram matrix is decomposed in float64: float32 resolves eigenvalues to about
# eps * lambda_1, so a top-r eigenvalue 400x smaller than lambda_1 would lose digits. On SmolLM2 every projection is
# above it (min 0.14 at r=32).
FLOAT32_GRAM_MIN_RATIO = 0.05

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (d_out, r), sigma (r,), Vh (r, d_in)
T = TypeVar("T")


def exact_top_svd(w: torch.Tensor, r: int) -> Factors:
    """(U, sigma, Vh) of the top r singular triplets of the float32 matrix ``w``, sigma descending, all float32."""
    found = _gram_top_svd(w, r, torch.float32)
    if found is None or found[1][-1] < FLOAT32_GRAM_MIN_RATIO * found[1][0]:
        found = _gram_top_svd(w, r, torch.float64)
    if found is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    return tuple(t.float() for t in found)


def _gram_top_svd(w: torch.Tensor, r: int, dtype: torch.dtype) -> Optional[Factors]:
    """The top r from the Gram matrix in ``dtype``; None if sigma_r ~ 0 (then the Gram route loses the vectors)."""
    wide = w.shape[0] <= w.shape[1]
    x = w.to(dtype)
    eigenvalues, eigenvectors = top_eigenpairs(x @ x.T if wide else x.T @ x, r)
    sigma = eigenvalues.clamp_min(0.0).sqrt()
    if sigma[-1] <= 1e-6 * max(float(sigma[0]), 1e-30):
        return None
    if wide:  # eigenvectors are U's columns: V^T = diag(1/sigma) U^T W
        return eigenvectors, sigma, (eigenvectors.T @ x) / sigma[:, None]
    return (x @ eigenvectors) / sigma[None, :], sigma, eigenvectors.T  # V's columns: U = W V diag(1/sigma)


def top_eigenpairs(gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenvalues (descending, (r,)) and their eigenvectors ((n, r)) of a symmetric matrix."""
    n = gram.shape[0]
    if gram.device.type == "cpu" and r < n and gram.dtype in (torch.float32, torch.float64):
        syevr = _lapacke_syevr()
        if syevr is not None:
            return _subset_syevr(syevr[gram.dtype], gram, r)
    values, vectors = torch.linalg.eigh(gram)  # PyTorch's own LAPACK: the path without SciPy's wheel
    return values.flip(0)[:r], vectors.flip(1)[:, :r]


_ROW_MAJOR = 101


def _subset_syevr(syevr: Callable, gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LAPACKE_?syevr for eigenvalues n-r+1..n (1-based, ascending), called through ctypes, which releases the GIL:
    SciPy's own wrapper holds it, so two decompositions could not run side by side."""
    n = gram.shape[0]
    a = gram.detach().clone(memory_format=torch.contiguous_format)  # overwritten by LAPACK
    values = torch.empty(n, dtype=gram.dtype)
    vectors = torch.empty(n, r, dtype=gram.dtype)  # row-major (n, r): ldz = r
    found = ctypes.c_int(0)
    support = (ctypes.c_int * (2 * r))()
    info = syevr(_ROW_MAJOR, b"V", b"I", b"L", n, a.data_ptr(), n, 0.0, 0.0, n - r + 1, n, 0.0,
                 ctypes.byref(found), values.data_ptr(), vectors.data_ptr(), r, support)
    if info != 0 or found.value != r:
        raise RuntimeError(f"LAPACK ?syevr failed (info={info}, {found.value} of {r} eigenvalues found)")
    return values[:r].flip(0), vectors.flip(1)


@functools.lru_cache(maxsize=None)
def _bundled_openblas() -> Optional[ctypes.CDLL]:
    """The OpenBLAS that SciPy's PyPI wheels bundle (32-bit integers, ``scipy_`` prefix), found without importing
    SciPy; None for any other layout (no SciPy, a SciPy built against MKL, conda's): then PyTorch's eigh is used."""
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):  # a broken or stubbed scipy entry in sys.modules
        return None
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).resolve().parent.parent / "scipy.libs"
    for path in sorted(folder.glob("libscipy_openblas-*.so*")):  # not openblas64_: ILP64 integers
        try:
            lib = ctypes.CDLL(str(path))
            for name in ("scipy_LAPACKE_ssyevr", "scipy_LAPACKE_dsyevr", "scipy_openblas_get_num_threads",
                         "scipy_openblas_set_num_threads"):
                getattr(lib, name)
        except (OSError, AttributeError):
            continue
        return lib
    return None


@functools.lru_cache(maxsize=None)
def _lapacke_syevr() -> Optional[dict[torch.dtype, Callable]]:
    """{float32: LAPACKE_ssyevr, float64: LAPACKE_dsyevr} from the bundled OpenBLAS, typed for ctypes; or None."""
    lib = _bundled_openblas()
    if lib is None:
        return None
    functions = {torch.float32: lib.scipy_LAPACKE_ssyevr, torch.float64: lib.scipy_LAPACKE_dsyevr}
    for dtype, function in functions.items():
        real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_int, real, real, ctypes.c_int, ctypes.c_int, real, ctypes.POINTER(ctypes.c_int),
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    return functions


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed (small) linear algebra on one thread: PyTorch's intra-op pool (which also bounds the LAPACK
    inside PyTorch) and, where it is used, the OpenBLAS bundled with SciPy's wheel."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    openblas = _bundled_openblas()
    blas_threads = openblas.scipy_openblas_get_num_threads() if openblas is not None else None
    try:
        if openblas is not None:
            openblas.scipy_openblas_set_num_threads(1)
        yield
    finally:
        if openblas is not None:
            openblas.scipy_openblas_set_num_threads(blas_threads)
        torch.set_num_threads(previous)


def decomposition_workers() -> int:
    """How many weights to decompose at once: the threads PyTorch would use, bounded by the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores))


def decompose_many(items: Mapping[str, T], decompose: Callable[[str, T], object], *, desc: str,
                   progress: Optional[bool] = None) -> dict[str, object]:
    """{name: decompose(name, item)} for every item, in order, one item per worker thread, each single-threaded.

    ``progress``: a tqdm bar (``desc: i/N modules``); None shows it on a terminal once the work has lasted 2 s (a
    large model), False never, True always. GPU tensors are decomposed one after the other on their device.
    """
    names = list(items)
    bar = tqdm(total=len(names), desc=desc, unit="module", leave=False, delay=2 if progress is None else 0,
               disable=None if progress is None else not progress)
    on_gpu = any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in items.values())
    workers = 1 if on_gpu else min(decomposition_workers(), len(names))
    results: dict[str, object] = {}
    try:
        if workers <= 1:
            with contextlib.nullcontext() if on_gpu else single_threaded():
                for name in names:
                    results[name] = decompose(name, items[name])
                    bar.update()
            return results
        with single_threaded(), ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {name: pool.submit(decompose, name, items[name]) for name in names}
            try:
                for name in names:  # in order: the error raised is the first failing module's, as in a plain loop
                    results[name] = futures[name].result()
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return results
    finally:
        bar.close()
