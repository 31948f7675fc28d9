import math

import pytest
import torch

from scalable_shampoo.matrix_roots import (
    coupled_newton_inverse_root,
    eigh_inverse_root,
    inverse_root,
    matrix_power,
    max_eigenvalue,
)

METHODS = ["eigh", "newton"]


def rotation(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q


def spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """Q·diag(λ)·Qᵀ with λ spread log-evenly from 1 down to 1/cond, in float64."""
    q = rotation(n, seed)
    lam = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return (q * lam) @ q.T


def reference_root(a: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """(A + ε·I)^(-1/p) in float64."""
    a = a.double()
    lam, q = torch.linalg.eigh(a + eps * torch.eye(a.shape[-1], dtype=torch.float64))
    return (q * lam.clamp_min(eps).pow(-1.0 / p)) @ q.T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_known_roots_of_a_rotated_diagonal(method, p):
    # A = Q·diag(k^p)·Qᵀ has A^(-1/p) = Q·diag(1/k)·Qᵀ exactly.
    k = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    q = rotation(5, seed=p)
    a = (q * k.pow(p)) @ q.T
    expected = (q / k) @ q.T
    res = inverse_root(a, p, eps=1e-300, relative_eps=False, method=method)
    assert bool(res.ok)
    torch.testing.assert_close(res.root, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_two_by_two_closed_form(method):
    # [[2,1],[1,2]] has eigenvalues 3 and 1 with eigenvectors (1,1)/√2, (1,−1)/√2.
    a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    s, t = 3.0**-0.5, 1.0
    expected = torch.tensor([[s + t, s - t], [s - t, s + t]], dtype=torch.float64) / 2
    res = inverse_root(a, 2, eps=1e-300, relative_eps=False, method=method)
    torch.testing.assert_close(res.root, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("cond", [1e1, 1e4, 1e7, 1e10])
def test_fp64_roots_match_fp64_eigh_across_condition_numbers(method, p, cond):
    a = spd(48, cond, seed=int(math.log10(cond)))
    res = inverse_root(a, p, method=method)
    assert bool(res.ok)
    expected = reference_root(a, p, float(res.eps))
    err = (res.root - expected).norm() / expected.norm()
    assert err < 1e-7


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("cond", [1e1, 1e4, 1e7, 1e10])
def test_fp32_roots_match_fp64_eigh_within_fp32_limits(method, p, cond):
    # ε = 1e-6·λ_max caps cond(A_d) near 1e6, where fp32 can still resolve the
    # spectrum only roughly: tight for well-conditioned inputs, a few % beyond.
    a = spd(48, cond, seed=int(math.log10(cond)))
    res = inverse_root(a.float(), p, method=method)
    assert bool(res.ok) and res.root.dtype == torch.float32
    expected = reference_root(a, p, float(res.eps))
    err = (res.root.double() - expected).norm() / expected.norm()
    assert err < (1e-5 if cond <= 1e1 else 1e-3 if cond <= 1e4 else 0.1)


def test_fp32_input_with_fp64_computation_is_accurate():
    a = spd(48, 1e10).float()
    res = inverse_root(a, 4, dtype=torch.float64)
    assert res.root.dtype == torch.float32
    expected = reference_root(a.double(), 4, float(res.eps))
    assert (res.root.double() - expected).norm() / expected.norm() < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_input_is_never_mutated(method):
    a = spd(16, 1e3).float()
    before = a.clone()
    inverse_root(a, 4, method=method)
    inverse_root(a, 4, method=method, relative_eps=False, eps=1e-3)
    assert torch.equal(a, before)


def test_newton_and_eigh_agree_on_a_batch():
    a = torch.stack([spd(32, c, seed=i).float() for i, c in enumerate([1e1, 1e3, 1e5])])
    e = inverse_root(a, 4, method="eigh")
    n = inverse_root(a, 4, method="newton")
    assert e.ok.all() and n.ok.all()
    torch.testing.assert_close(e.root, n.root, rtol=2e-3, atol=2e-3 * float(e.root.abs().max()))


def test_batch_equals_one_by_one():
    a = torch.stack([spd(8, 1e2, seed=i) for i in range(3)])
    batched = inverse_root(a, 4, method="newton").root
    single = torch.stack([inverse_root(m, 4, method="newton").root for m in a])
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)


def test_relative_eps_scales_with_lambda_max():
    a = spd(16, 1e2)
    small = inverse_root(a, 2, eps=1e-4)
    big = inverse_root(1000 * a, 2, eps=1e-4)
    torch.testing.assert_close(float(big.eps), 1000 * float(small.eps), rtol=1e-6, atol=0)
    torch.testing.assert_close(big.root, small.root / 1000**0.5, rtol=1e-9, atol=1e-12)


def test_max_eigenvalue_is_close_and_never_zero_for_nonzero_psd():
    a = spd(32, 1e3)
    assert abs(float(max_eigenvalue(a, iters=50)) - 1.0) < 1e-3
    # The start vector may be orthogonal to the top eigenvector: [[1,-1],[-1,1]].
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert float(max_eigenvalue(b)) >= 1.0


def test_zero_matrix_with_relative_eps_fails_cleanly():
    res = inverse_root(torch.zeros(2, 4, 4), 4)
    assert not res.ok.any()


def test_nonfinite_matrix_is_rejected():
    a = spd(4, 10).float()
    a[0, 0] = float("nan")
    res = inverse_root(a, 4, method="eigh")
    assert not bool(res.ok)
    res = inverse_root(a, 4, method="newton")
    assert not bool(res.ok)


def test_bad_root_is_retried_with_larger_eps():
    # A singular matrix under a negligible absolute ε and a strict residual bound:
    # even fp64 can't meet it, the retries raise ε ×10 until the residual is acceptable.
    v = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
    a = (v @ v.T).float()
    res = inverse_root(a, 2, eps=1e-12, relative_eps=False, method="eigh", retries=20, max_residual=1e-6)
    assert bool(res.ok)
    assert float(res.eps) > 1e-12
    assert float(res.residual) <= 1e-6
    res0 = inverse_root(a, 2, eps=1e-12, relative_eps=False, method="eigh", retries=0, max_residual=1e-6)
    assert not bool(res0.ok)


def test_newton_divergence_guard_returns_finite_root():
    # Huge condition number and a tolerance below fp32 precision: the iteration
    # stalls; the guard must stop it with the last good X, never a NaN.
    a = spd(32, 1e12).float() + 1e-12 * torch.eye(32)
    x = coupled_newton_inverse_root(a, 4, tol=1e-12, max_iters=100)
    assert torch.isfinite(x).all()


def test_eigh_and_newton_building_blocks():
    a = spd(6, 50)
    eps = torch.tensor(0.0, dtype=torch.float64)
    x = eigh_inverse_root(a, 4, eps)
    torch.testing.assert_close(matrix_power(x, 4) @ a, torch.eye(6, dtype=torch.float64))
    y = coupled_newton_inverse_root(a, 4, tol=1e-12)
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(matrix_power(a, 5), a @ a @ a @ a @ a)


def test_p_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="p must be a positive integer, got 0"):
        inverse_root(torch.eye(2), 0)


def test_fallback_chain_order():
    from scalable_shampoo.matrix_roots import RootMethod, fallback_chain

    names = [c[0] for c in fallback_chain(RootMethod.NEWTON, torch.float32, 1e-6, 2)]
    assert names == ["newton/fp32", "eigh/fp32", "eigh/fp64", "eigh/fp64/eps×1e1", "eigh/fp64/eps×1e2"]
    assert [c[0] for c in fallback_chain(RootMethod.EIGH, torch.float64, 1e-6, 0)] == ["eigh/fp64"]


def test_fp32_failure_falls_back_to_fp64_then_to_larger_eps():
    a = spd(32, 1e12).float()
    res = inverse_root(a, 4, method="newton", max_residual=1e-3)
    assert bool(res.ok) and res.stages[int(res.stage)] == "eigh/fp64"
    # A singular matrix under a negligible absolute ε and a strict bound:
    # only a larger ε gives an acceptable root.
    v = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
    b = (v @ v.T).float()
    res = inverse_root(b, 2, eps=1e-12, relative_eps=False, method="eigh", retries=8, max_residual=1e-6)
    assert bool(res.ok) and "eps×" in res.stages[int(res.stage)]
    assert float(res.residual) <= 1e-6 and float(res.eps) > 1e-12


def test_probe_residual_tracks_the_full_residual():
    from scalable_shampoo.matrix_roots import _probes, probe_residual, root_residual

    a = spd(32, 1e4)
    good = inverse_root(a, 4, eps=1e-300, relative_eps=False).root
    bad = good * 1.01
    v = _probes(a)
    assert probe_residual(good, a @ v, v, 4) < 1e-8 and root_residual(good, a, 4) < 1e-8
    assert probe_residual(bad, a @ v, v, 4) > 0.03 and root_residual(bad, a, 4) > 0.03
