"""The exact top-r solver and the parallel, single-threaded decomposition of many weights (issue 13.6)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import lamda_peft.eigensolver as eigensolver
import lamda_peft.spectral as spectral
from lamda_peft import LamdaConfig, LamdaLayer
from lamda_peft.eigensolver import decompose_many, exact_top_svd, single_threaded, top_eigenpairs
from lamda_peft.spectral import top_svd, top_svds

from conftest import make_tiny_llama


def _symmetric_with_spectrum(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64)).Q
    return (Q * values) @ Q.T, Q


@pytest.mark.parametrize("solver", ["lapacke", "scipy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_eigenpairs_match_the_known_spectrum(dtype, solver, monkeypatch):
    """Both CPU routes: LAPACKE ?syevr through ctypes (SciPy's bundled OpenBLAS) and SciPy's eigh elsewhere."""
    if solver == "lapacke":
        assert eigensolver._lapacke_syevr() is not None, "SciPy's wheel bundles OpenBLAS with LAPACKE on this platform"
    else:
        monkeypatch.setattr(eigensolver, "_lapacke_syevr", lambda: None)
    values = torch.linspace(10.0, 0.1, 60, dtype=torch.float64)
    matrix, Q = _symmetric_with_spectrum(values)
    top, vectors = top_eigenpairs(matrix.to(dtype), 7)
    assert top.dtype == dtype and vectors.shape == (60, 7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(top.double(), values[:7], rtol=tol, atol=tol)
    alignment = (vectors.double().T @ Q[:, :7]).abs().diagonal()  # each eigenvector up to its sign
    torch.testing.assert_close(alignment, torch.ones(7, dtype=torch.float64), rtol=0, atol=100 * tol)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)], ids=["tall", "wide"])
def test_exact_top_svd_against_float64(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    U, S, Vh = exact_top_svd(w, 6)
    ref = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), ref.S[:6], rtol=1e-5, atol=1e-6)
    top = (U.double() * S.double()) @ Vh.double()
    expected = (ref.U[:, :6] * ref.S[:6]) @ ref.Vh[:6]
    assert float((top - expected).norm() / expected.norm()) < 1e-5


def test_decompose_many_is_ordered_single_threaded_and_restores_threads():
    before = torch.get_num_threads()
    seen_threads = []

    def work(name, value):
        seen_threads.append(torch.get_num_threads())
        return value * 2

    items = {f"m{i}": i for i in range(12)}
    assert list(decompose_many(items, work, desc="test", progress=False).items()) == [(k, v * 2) for k, v in items.items()]
    assert seen_threads == [1] * 12  # every decomposition ran on one intra-op thread
    assert torch.get_num_threads() == before
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_decompose_many_raises_the_first_failing_item():
    def work(name, value):
        if value >= 3:
            raise ValueError(f"{name} failed")
        return value

    with pytest.raises(ValueError, match="^m3 failed$"):
        decompose_many({f"m{i}": i for i in range(10)}, work, desc="test", progress=False)
    assert torch.get_num_threads() >= 1


def test_top_svds_equal_single_calls():
    g = torch.Generator().manual_seed(2)
    weights = {f"w{i}": torch.randn(40 + i, 24, generator=g) for i in range(5)}
    ranks = {name: 2 + i for i, name in enumerate(weights)}
    for method in ("exact", "randomized"):
        many = top_svds(weights, ranks, method=method, seed=3)
        for name, w in weights.items():
            one = top_svd(w, ranks[name], method=method, seed=3, name=name)
            for a, b in ((many[name].U, one.U), (many[name].S, one.S), (many[name].Vh, one.Vh)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_uniform_lamda_decomposes_each_weight_once_up_front(monkeypatch):
    """The uniform path prefetches every decomposition (several at once); the layers then reuse them."""
    calls = []
    real = spectral._exact_top_svd
    monkeypatch.setattr(spectral, "_exact_top_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = LamdaConfig(r=4, target_modules="all-linear", rank_pattern={"k_proj": 2})
    model = get_peft_model(make_tiny_llama(), config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}
    assert len(calls) == len(layers) == 14
    base = make_tiny_llama()
    for name, layer in layers.items():
        weight = base.get_submodule(name.removeprefix("base_model.model.")).weight
        r = 2 if name.endswith("k_proj") else 4
        expected = top_svd(weight, r)
        assert layer.r["default"] == r
        root = torch.sqrt(expected.S / layer.scaling["default"])
        torch.testing.assert_close(layer.lamda_A["default"], root[:, None] * expected.Vh, rtol=0, atol=0)
