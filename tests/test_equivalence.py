"""Shampoo against torch.optim and against a from-scratch float64 reference."""

import pytest
import torch
from conftest import run

from scalable_shampoo import Shampoo

NEVER = 10**9  # start_preconditioning_step that is never reached


SHAPES = [(6, 5), (5,), (2, 3, 4), ()]


CASES = {
    "sgd": (
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        dict(lr=0.1, betas=(0.0, 0.999), weight_decay=0.0, grafting="sgd"),
    ),
    "sgd_momentum_l2": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
        dict(lr=0.05, betas=(0.0, 0.999), momentum=0.9, weight_decay=0.1, decoupled_weight_decay=False, grafting="sgd"),
    ),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
        dict(lr=0.05, betas=(0.0, 0.999), momentum=0.8, nesterov=True, weight_decay=0.0, grafting="sgd"),
    ),
    "adagrad": (
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-10),
        dict(lr=0.1, betas=(0.0, 1.0), eps=1e-10, weight_decay=0.0, grafting="adagrad"),
    ),
    "adam_l2": (
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05, decoupled_weight_decay=False, grafting="adam"),
    ),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, grafting="adam"),
    ),
    "rmsprop": (
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95, eps=1e-8),
        dict(lr=0.01, betas=(0.0, 0.95), eps=1e-8, weight_decay=0.0, grafting="rmsprop"),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_without_roots_shampoo_is_the_grafted_method(name, dtype):
    torch_factory, kwargs = CASES[name]
    expected, _ = run(torch_factory, SHAPES, steps=12, dtype=dtype)
    got, _ = run(lambda ps: Shampoo(ps, start_preconditioning_step=NEVER, **kwargs), SHAPES, steps=12, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, **tol)


def test_rejected_roots_leave_the_grafted_method():
    # Every root is rejected (impossible residual bound, no retries): Shampoo is AdamW.
    expected, _ = run(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), SHAPES, steps=12)
    got, _ = run(
        lambda ps: Shampoo(
            ps, lr=0.01, weight_decay=0.1, precondition_frequency=2, start_preconditioning_step=2,
            max_root_residual=1e-300, root_retries=0,
        ),
        SHAPES,
        steps=12,
    )
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def reference_shampoo(w0, grads, *, lr, b1, b2, eps, wd, meps, block, every, start):
    """A from-scratch float64 Shampoo for one matrix: blocks of rows/cols, eigh roots,
    absolute ε, Adam grafting per block, decoupled weight decay."""
    w = w0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    blocks = [(r, c) for r in range(0, w.shape[0], block) for c in range(0, w.shape[1], block)]
    stats = {}
    roots = {}

    def inv_root(a, p):
        lam, q = torch.linalg.eigh(a + meps * torch.eye(a.shape[0], dtype=a.dtype))
        return q @ torch.diag(lam.clamp_min(meps) ** (-1.0 / p)) @ q.T

    for t, g in enumerate(grads, start=1):
        for r, c in blocks:
            gb = g[r : r + block, c : c + block]
            left, right = stats.get((r, c), (0.0, 0.0))
            stats[(r, c)] = (b2 * left + (1 - b2) * gb @ gb.T, b2 * right + (1 - b2) * gb.T @ gb)
        if t >= start and (t - start) % every == 0:
            roots = {k: (inv_root(lft, 4), inv_root(rgt, 4)) for k, (lft, rgt) in stats.items()}
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        adam = mhat / ((v / (1 - b2**t)).sqrt() + eps)
        update = adam.clone()
        for r, c in blocks:
            if (r, c) in roots:
                lft, rgt = roots[(r, c)]
                pb = lft @ mhat[r : r + block, c : c + block] @ rgt
                db = adam[r : r + block, c : c + block]
                update[r : r + block, c : c + block] = pb * db.norm() / pb.norm()
        w = w * (1 - lr * wd) - lr * update
    return w


def test_a_few_steps_equal_the_from_scratch_reference():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(7, 6, dtype=torch.float64, generator=g)
    grads = [torch.randn(7, 6, dtype=torch.float64, generator=g) for _ in range(11)]
    hp = dict(lr=0.02, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, meps=1e-3, block=4, every=3, start=2)
    expected = reference_shampoo(w0, grads, **hp)

    w = w0.clone().requires_grad_()
    opt = Shampoo(
        [w], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"],
        matrix_eps=hp["meps"], matrix_eps_relative=False, block_size=hp["block"],
        precondition_frequency=hp["every"], start_preconditioning_step=hp["start"],
        root_method="eigh", root_dtype=torch.float64,
    )
    for gr in grads:
        w.grad = gr.clone()
        opt.step()
    assert "root.3.1" in opt.state[w]  # 2×2 blocks, all preconditioned
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)
