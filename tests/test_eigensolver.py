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

import ctypes.util
import os
from pathlib import Path
import importlib.machinery
import shutil
import subprocess
import sys
import textwrap


def _symmetric_with_spectrum(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64)).Q
    return (Q * values) @ Q.T, Q


@pytest.mark.parametrize("solver", ["lapacke", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_eigenpairs_match_the_known_spectrum(dtype, solver, monkeypatch):
    """Both CPU routes: LAPACKE ?syevr through ctypes (SciPy's bundled OpenBLAS) and PyTorch's eigh elsewhere."""
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


def _fake_scipy(root, libraries: dict[str, str]) -> importlib.machinery.ModuleSpec:
    """A scipy package laid out under ``root`` with ``scipy.libs/<name>`` copied from ``libraries`` {name: source}."""
    package = root / "scipy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (root / "scipy.libs").mkdir()
    for name, source in libraries.items():
        target = root / "scipy.libs" / name
        shutil.copy(source, target) if source else target.write_bytes(b"not a shared library")
    return importlib.machinery.ModuleSpec("scipy", None, origin=str(package / "__init__.py"))


@pytest.mark.parametrize("layout", ["no scipy", "no bundled library (MKL, conda)", "library without the symbols",
                                    "unloadable file"])
def test_every_other_scipy_layout_falls_back_to_torch(layout, tmp_path, monkeypatch):
    """SciPy's bundled OpenBLAS is a private layout: anything else must give the PyTorch path, with the same factors."""
    libm = ctypes.util.find_library("m")
    libm_path = next(Path(p) for p in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                                         "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
                     if (Path(p) / libm).exists()) / libm if libm else None
    if layout == "library without the symbols" and libm_path is None:
        pytest.skip("no libm found to stand in for a library without LAPACKE")
    spec = {
        "no scipy": lambda: None,
        "no bundled library (MKL, conda)": lambda: _fake_scipy(tmp_path, {}),
        "library without the symbols": lambda: _fake_scipy(tmp_path, {"libscipy_openblas-0000.so": str(libm_path)}),
        "unloadable file": lambda: _fake_scipy(tmp_path, {"libscipy_openblas-0000.so": ""}),
    }[layout]()
    real_find_spec = eigensolver.importlib.util.find_spec
    monkeypatch.setattr(eigensolver.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "scipy" else real_find_spec(name, *a))
    for cached in (eigensolver._bundled_openblas, eigensolver._lapacke_syevr):
        cached.cache_clear()
    try:
        assert eigensolver._bundled_openblas() is None and eigensolver._lapacke_syevr() is None
        with single_threaded():
            assert torch.get_num_threads() == 1
        w = torch.randn(70, 40, generator=torch.Generator().manual_seed(4))
        U, S, Vh = exact_top_svd(w, 5)
        ref = torch.linalg.svd(w.double(), full_matrices=False)
        torch.testing.assert_close(S.double(), ref.S[:5], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U.double() * S.double()) @ Vh.double(), (ref.U[:, :5] * ref.S[:5]) @ ref.Vh[:5],
                                   rtol=1e-4, atol=1e-5)
    finally:
        for cached in (eigensolver._bundled_openblas, eigensolver._lapacke_syevr):
            cached.cache_clear()


def test_lamda_and_lamda_plus_plus_without_scipy_in_a_fresh_process(tmp_path):
    """A core install has no SciPy: with it hidden from the import system, LaMDA and LaMDA++ build, and their factors
    equal those of the fast path in this process up to float32 rounding."""
    script = textwrap.dedent('''
        import sys
        for hidden in ("scipy", "threadpoolctl", "sklearn"):  # None in sys.modules: import fails, find_spec is None
            sys.modules[hidden] = None
        sys.path.insert(0, sys.argv[2])
        import torch
        from peft import get_peft_model
        from lamda_peft import LamdaConfig, eigensolver
        from conftest import make_tiny_llama
        assert eigensolver._lapacke_syevr() is None
        state = {}
        for name, config in (("lamda", LamdaConfig(r=4, target_modules="all-linear")),
                             ("lamda++", LamdaConfig(r=4, target_modules="all-linear", rank_allocation="energy"))):
            model = get_peft_model(make_tiny_llama(), config)
            state[name] = {k: v for k, v in model.state_dict().items() if "lamda_" in k}
        assert sys.modules["scipy"] is None
        torch.save(state, sys.argv[1])
    ''')
    out = tmp_path / "factors.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    without_scipy = torch.load(out)
    for name, config in (("lamda", LamdaConfig(r=4, target_modules="all-linear")),
                         ("lamda++", LamdaConfig(r=4, target_modules="all-linear", rank_allocation="energy"))):
        model = get_peft_model(make_tiny_llama(), config)
        here = {k: v for k, v in model.state_dict().items() if "lamda_" in k}
        assert here.keys() == without_scipy[name].keys() and len(here) > 0
        for key, value in here.items():  # singular vectors up to sign: compare the products A^T A and B B^T
            other = without_scipy[name][key]
            assert other.shape == value.shape, key
            if "lamda_A" in key:
                torch.testing.assert_close(other.T @ other, value.T @ value, rtol=1e-4, atol=1e-5)
            elif "lamda_B" in key:
                torch.testing.assert_close(other @ other.T, value @ value.T, rtol=1e-4, atol=1e-5)
