"""Spectral init against float64 references (method.md 3.1)."""

import pytest
import torch

from lamda_peft.spectral import spectral_factors, top_svd


def test_exact_factors_reproduce_top_r_part_in_float64():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    r, scaling = 6, 16 / 6
    svd = top_svd(weight, r)
    factors = spectral_factors(svd, scaling)
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    assert torch.allclose(scaling * factors.B0.double() @ factors.A.double(), top, atol=1e-4)
    assert torch.allclose(svd.S.double(), S[:r], rtol=1e-5)
    assert svd.total_energy == pytest.approx(float(weight.double().square().sum()))
    assert svd.energy(r) == pytest.approx(float(S[:r].square().sum() / S.square().sum()), rel=1e-6)


def test_svd_runs_in_float32_for_half_weights():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    svd = top_svd(weight, 4)
    assert svd.U.dtype == svd.S.dtype == svd.Vh.dtype == torch.float32
    reference = torch.linalg.svdvals(weight.double())[:4]
    assert torch.allclose(svd.S.double(), reference, rtol=1e-5)


def test_randomized_is_seeded_and_independent_of_global_rng():
    weight = torch.randn(64, 40, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(100)
    first = top_svd(weight, 5, method="randomized", seed=7)
    torch.manual_seed(999)
    torch.randn(10)
    second = top_svd(weight, 5, method="randomized", seed=7)
    assert torch.equal(first.U, second.U) and torch.equal(first.Vh, second.Vh) and torch.equal(first.S, second.S)
    other_seed = top_svd(weight, 5, method="randomized", seed=8)
    assert not torch.equal(first.U, other_seed.U)
    exact = top_svd(weight, 5)
    # with 4 power iterations the subspace is accurate on a matrix of this size
    assert torch.allclose(first.S, exact.S, rtol=1e-3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="NaN or Inf"):
        top_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, name="layer.q")
    with pytest.raises(ValueError, match=r"rank r=5 .*min\(d_out, d_in\)"):
        top_svd(torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match="unknown SVD method"):
        top_svd(torch.randn(4, 8), 2, method="qr")


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_exact_path_equals_a_float64_svd_for_wide_tall_and_rank_deficient(shape):
    torch.manual_seed(3)
    weight = torch.randn(*shape)
    low_rank = torch.randn(shape[0], 3) @ torch.randn(3, shape[1])  # rank 3 < r: falls back to the plain SVD
    for w in (weight, low_rank):
        svd = top_svd(w, 5)
        U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        assert torch.allclose(svd.S.double(), S[:5], rtol=1e-5, atol=1e-5)
        reconstruction = svd.U.double() @ torch.diag(svd.S.double()) @ svd.Vh.double()
        assert torch.allclose(reconstruction, U[:, :5] @ torch.diag(S[:5]) @ Vh[:5], atol=1e-4)
        assert torch.allclose(svd.U.T.double() @ svd.U.double(), torch.eye(5, dtype=torch.float64), atol=1e-5)


def test_exact_path_stays_accurate_when_the_top_r_span_a_wide_range():
    """sigma_r / sigma_1 ~ 1e-3: float32 Gram eigenvalues would lose digits, so the float64 Gram is used."""
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(60, 30, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(40, 30, generator=gen, dtype=torch.float64))[0]
    sigma = torch.logspace(3, -1, 30, dtype=torch.float64)  # 1000 down to 0.1
    weight = (U * sigma) @ V.T
    r = 23  # sigma_23 / sigma_1 = 9e-4
    svd = top_svd(weight.float(), r)
    assert torch.allclose(svd.S.double(), sigma[:r], rtol=1e-5)
    # each singular pair up to sign: |<u_i, u_ref_i>| = 1
    assert torch.allclose((svd.U.double() * U[:, :r]).sum(0).abs(), torch.ones(r, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((svd.Vh.double().T * V[:, :r]).sum(0).abs(), torch.ones(r, dtype=torch.float64), atol=1e-5)
