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
