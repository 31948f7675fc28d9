"""``basis_refresh="qr"``: the eigenvalue-corrected basis refreshed by one QR power step (SOAP's
cheaper refresh) instead of a full eigendecomposition.

Checked against matrices whose eigenvectors are known, against a float64 reference written
here from the formula (Q ← qr(L·Q_prev, largest first), R's diagonal ≥ 0, back to ascending),
and through the schedulers: deterministic background bit-identical to inline.
"""

from __future__ import annotations

import pytest
import torch
from test_eigenvalue_corrected import EC, ec_opt, fit, model, rotate, same

from scalable_shampoo import BackgroundRoots, InlineRoots, Shampoo
from scalable_shampoo.matrix_roots import power_step_basis


def known(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, its eigenvectors Q in ascending order of eigenvalue, the eigenvalues), float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    lam = torch.linspace(0.1, 3.0, n, dtype=torch.float64) ** 2
    return q @ torch.diag(lam) @ q.T, q, lam


def qr_step(stat: torch.Tensor, q_prev: torch.Tensor) -> torch.Tensor:
    """The refresh, from its formula: one simultaneous-iteration step, largest eigenvalue first."""
    q, r = torch.linalg.qr(stat @ q_prev.flip(-1))
    return (q * torch.sign(torch.diagonal(r))).flip(-1)


def test_a_basis_of_exact_eigenvectors_is_a_fixed_point():
    lq = []
    for seed in range(3):
        stat, q, _ = known(6, seed)
        lq.append(stat @ q.flip(-1))
    res = power_step_basis(torch.stack(lq))
    assert res.ok.all() and res.stages == ("qr/fp64",)
    for seed, got in enumerate(res.root):
        stat, q, lam = known(6, seed)
        torch.testing.assert_close(got, q, rtol=0, atol=1e-12)  # same columns, order and signs
        assert abs(float(res.lambda_max[seed]) - float(lam[-1])) < 1e-12


def test_repeated_steps_converge_to_the_eigenvectors_in_ascending_order():
    stat, q_true, _ = known(8)
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(q_true + 0.3 * torch.randn(8, 8, dtype=torch.float64, generator=g))[0]  # a stale basis
    before = (q.T @ q_true).abs().diagonal().min()
    for _ in range(200):
        q = power_step_basis((stat @ q.flip(-1))[None]).root[0]
    overlap = (q.T @ q_true).abs()  # |cos| between each column and each eigenvector
    assert before < 0.99
    torch.testing.assert_close(overlap, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_non_finite_product_is_rejected():
    stat, q, _ = known(4)
    lq = torch.stack([stat @ q.flip(-1), torch.full((4, 4), float("nan"), dtype=torch.float64)])
    res = power_step_basis(lq)
    assert res.ok.tolist() == [True, False] and res.stage.tolist() == [0, -1]


def reference_qr(w0, grads, *, lr, b1, b2, eps, every, start):
    """Eigenvalue-corrected Shampoo of one matrix that is one block, from the formulas: the
    first basis from eigh, every later one by :func:`qr_step` from the one before."""
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    stats = [torch.zeros(n, n, dtype=w0.dtype) for n in w0.shape]
    qs: list[torch.Tensor | None] = [None, None]
    for t, g in enumerate(grads, start=1):
        stats = [b2 * stats[0] + (1 - b2) * g @ g.T, b2 * stats[1] + (1 - b2) * g.T @ g]
        if t >= start and (t - start) % every == 0:
            qs = [torch.linalg.eigh(s)[1] if q is None else qr_step(s, q) for s, q in zip(stats, qs)]
        gt = rotate(g, qs, back=False)
        v = b2 * v + (1 - b2) * gt * gt
        m = b1 * m + (1 - b1) * g
        mt = rotate(m / (1 - b1**t), qs, back=False)
        w = w - lr * rotate(mt / ((v / (1 - b2**t)).sqrt() + eps), qs, back=True)
    return w


def test_equals_the_float64_reference():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(4, 6, dtype=torch.float64, generator=g)
    grads = [torch.randn(4, 6, dtype=torch.float64, generator=g) for _ in range(20)]
    hp = dict(lr=0.02, b1=0.9, b2=0.95, eps=1e-8, every=4, start=7)  # bases at 7 (eigh), 11, 15, 19 (QR)
    w = w0.clone().requires_grad_()
    opt = Shampoo([w], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], precondition_frequency=hp["every"],
                  start_preconditioning_step=hp["start"], block_size=8, root_dtype=torch.float64, preconditioner=EC,
                  weight_decay=0.0, basis_refresh="qr")  # fmt: skip
    for gr in grads:
        w.grad = gr.clone()
        opt.step()
    assert {r["method"] for r in opt.diagnostics()["blocks"]} == {"qr/fp64"}
    torch.testing.assert_close(w.detach(), reference_qr(w0, grads, **hp), rtol=1e-10, atol=1e-10)
    eigh = Shampoo([w0.clone().requires_grad_()], root_dtype=torch.float64, preconditioner=EC, **{
        k: v for k, v in opt.param_groups[0].items() if k in ("lr", "betas", "eps", "precondition_frequency",
                                                               "start_preconditioning_step", "block_size",
                                                               "weight_decay")})  # fmt: skip
    p = eigh.param_groups[0]["params"][0]
    for gr in grads:
        p.grad = gr.clone()
        eigh.step()
    assert not torch.equal(p, w)  # the refresh changed the run, so the equality above says something


def test_deterministic_background_is_bitwise_inline(one_thread):
    inline_m, bg_m = model(), model()
    inline = ec_opt(inline_m, InlineRoots(delay=2), basis_refresh="qr")
    bg = ec_opt(bg_m, BackgroundRoots(delay=2, workers="thread"), basis_refresh="qr")
    try:
        fit(inline_m, inline, 0, 14)
        fit(bg_m, bg, 0, 14)
    finally:
        bg.close()
    assert same(inline_m, bg_m)
    assert {r["method"] for r in bg.diagnostics()["blocks"]} == {"qr/fp32"}  # refreshed by QR since the first


@pytest.mark.parametrize("value", ["power", None, 1])
def test_a_bad_value_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="basis_refresh"):
        Shampoo([torch.zeros(2, 2, requires_grad=True)], preconditioner=EC, basis_refresh=value)
