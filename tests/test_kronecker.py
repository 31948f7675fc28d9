import functools

import pytest
import torch

from scalable_shampoo.kronecker import axis_statistic, precondition, stacked_precondition, stacked_unfolding

SHAPES = [(5,), (4, 3), (3, 2, 4), (2, 3, 2, 3)]


def random_sym(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T


@pytest.mark.parametrize("shape", SHAPES)
def test_axis_statistic_is_a_partial_trace_of_the_full_outer_product(shape):
    g = torch.randn(shape, dtype=torch.float64)
    k = len(shape)
    full = torch.outer(g.flatten(), g.flatten()).reshape(shape + shape)  # vec(G)·vec(G)ᵀ
    for i in range(k):
        # trace out every index but i from the full (∏d)×(∏d) statistic
        x = full
        for j in reversed(range(k)):
            if j != i:
                x = x.diagonal(dim1=j, dim2=j + x.dim() // 2).sum(-1)
        torch.testing.assert_close(axis_statistic(g, i), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("skip", [None, 0, -1])
def test_precondition_equals_kronecker_product(shape, skip):
    g = torch.randn(shape, dtype=torch.float64)
    k = len(shape)
    axes = [i for i in range(k) if skip is None or i != skip % k]
    roots = {i: random_sym(shape[i], seed=i) for i in axes}
    factors = [roots.get(i, torch.eye(shape[i], dtype=torch.float64)) for i in range(k)]
    kron = functools.reduce(torch.kron, factors)  # (A₀ ⊗ A₁ ⊗ …)·vec(G), row-major vec
    expected = (kron @ g.flatten()).reshape(shape)
    torch.testing.assert_close(precondition(g, roots), expected)


def test_matrix_case_is_l_g_r():
    g = torch.randn(4, 3, dtype=torch.float64)
    left, right = random_sym(4, 1), random_sym(3, 2)
    torch.testing.assert_close(precondition(g, {0: left, 1: right}), left @ g @ right)
    torch.testing.assert_close(precondition(g, {1: right}), g @ right)
    torch.testing.assert_close(axis_statistic(g, 0), g @ g.T)
    torch.testing.assert_close(axis_statistic(g, 1), g.T @ g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axes", ["all", "first"])
def test_stacked_functions_equal_the_per_block_ones(shape, axes):
    stack = torch.randn((3, *shape), dtype=torch.float64)
    chosen = range(len(shape)) if axes == "all" else [0]
    roots = {a: torch.stack([random_sym(shape[a], 10 * b + a) for b in range(3)]) for a in chosen}
    for a in range(len(shape)):
        u = stacked_unfolding(stack, a)
        for b in range(3):
            torch.testing.assert_close(u[b] @ u[b].T, axis_statistic(stack[b], a), rtol=1e-12, atol=1e-12)
    work = (torch.empty_like(stack), torch.empty_like(stack))
    for w in (None, work):
        got = stacked_precondition(stack, roots, w)
        for b in range(3):
            expected = precondition(stack[b], {a: r[b] for a, r in roots.items()})
            torch.testing.assert_close(got[b], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_statistic_by_quarters_equals_the_full_product(monkeypatch, n, beta2):
    """With SPLIT_DIM lowered below n, H ← β₂·H + w·UUᵀ by quarters (lower-left and diagonal
    products, the upper-right mirrored) equals the full product in fp64 (1e-14) for both axes of
    a stack; the upper-right quarter is exactly the lower-left one transposed. Packed storage
    writes the same lower triangle, bit for bit, and leaves the root's strict upper one alone."""
    import scalable_shampoo.kronecker as kron

    monkeypatch.setattr(kron, "SPLIT_DIM", 4)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, n, n + 2, dtype=torch.float64, generator=gen)
    for axis, m in ((0, n), (1, n + 2)):
        if m < 4:
            continue
        a = torch.randn(3, m, m, dtype=torch.float64, generator=gen)
        h0 = a @ a.mT
        u = stacked_unfolding(g, axis)
        want = beta2 * h0 + kron.statistic_weight(beta2) * (u @ u.mT)
        got = kron.accumulate_statistics_(h0.clone(), g, axis, beta2)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        half = m // 2
        assert torch.equal(got[:, :half, half:], got[:, half:, :half].mT)
        roots = torch.randn(3, m, m, dtype=torch.float64, generator=gen)
        packed = h0.tril() + roots.triu(1)
        upper = torch.ones(m, m, dtype=torch.bool).triu(1)
        kron.accumulate_statistics_(packed, g, axis, beta2, packed=(torch.empty_like(packed), upper))
        assert torch.equal(packed.tril(), got.tril()) and torch.equal(packed.triu(1), roots.triu(1))
