"""The eigenvalue-corrected preconditioner (``preconditioner="eigenvalue_corrected"``, ``eigen.py``).

A float64 reference written here from the formulas, Adam when no basis exists, the
schedulers (deterministic background bit-identical to inline), checkpoints, the
eigenbasis fallback chain, and bad option values.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_params, step_on_random_grads
from torch import nn

from scalable_shampoo import BackgroundRoots, InlineRoots, Shampoo
from scalable_shampoo.background import RootJob, RootOutcome, compute_roots
from scalable_shampoo.matrix_roots import eigenbasis

EC = "eigenvalue_corrected"
NEVER = 10**9


# ---------------------------------------------------------------- the float64 reference
def rotate(g: torch.Tensor, qs: list[torch.Tensor | None], back: bool) -> torch.Tensor:
    """G ×ᵢ Q_iᵀ (or ×ᵢ Q_i with ``back``) by one axis at a time; None: the axis is not rotated."""
    for axis, q in enumerate(qs):
        if q is not None:
            m = q if back else q.T  # new index i = Σ_j m[i, j]·g[…, j, …]
            g = torch.tensordot(m, g, dims=([1], [axis])).movedim(0, axis)
    return g


def reference_ec(w0, grads, *, lr, b1, b2, eps, wd, every, start, axes, p=2, rotated_m=False):
    """From-scratch eigenvalue-corrected Shampoo for one tensor that is one block: statistics
    H_a ← β₂H_a + (1−β₂)G₍ₐ₎G₍ₐ₎ᵀ on ``axes``, eigh bases at steps start, start+every, …,
    V ← β₂V + (1−β₂)G̃², P = (M̂ ×ᵢ Q_iᵀ)/(V̂^(1/p) + ε) ×ᵢ Q_i, decoupled weight decay.
    ``rotated_m``: M̃ ← β₁M̃ + (1−β₁)G̃ kept in the basis (as V, not re-rotated when it changes)."""
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    stats = {a: torch.zeros(w0.shape[a], w0.shape[a], dtype=w0.dtype) for a in axes}
    qs: list[torch.Tensor | None] = [None] * w0.dim()
    for t, g in enumerate(grads, start=1):
        for a in axes:
            u = g.movedim(a, 0).reshape(g.shape[a], -1)
            stats[a] = b2 * stats[a] + (1 - b2) * u @ u.T
        if t >= start and (t - start) % every == 0:
            for a in axes:
                qs[a] = torch.linalg.eigh(stats[a])[1]
        gt = rotate(g, qs, back=False)
        v = b2 * v + (1 - b2) * gt * gt
        m = b1 * m + (1 - b1) * (gt if rotated_m else g)
        mt = m / (1 - b1**t) if rotated_m else rotate(m / (1 - b1**t), qs, back=False)
        vhat = v / (1 - b2**t)
        root = p if any(q is not None for q in qs) else 2  # no basis yet: Adam's √
        update = rotate(mt / (vhat ** (1 / root) + eps), qs, back=True)
        w = w * (1 - lr * wd) - lr * update
    return w


CASES = {  # shape, optimizer options, the axes that keep a statistic
    "order1": ((5,), dict(precondition_1d=True), (0,)),
    "order2": ((4, 6), dict(), (0, 1)),
    "order3": ((3, 4, 5), dict(merge_dims_bound=4), (0, 1, 2)),
    "one_sided": ((4, 9), dict(max_preconditioner_dim=6), (0,)),
    "exponent_4": ((4, 6), dict(exponent_override=4), (0, 1)),
    "rotated_first_moment": ((3, 4, 5), dict(merge_dims_bound=4, first_moment_basis="rotated"), (0, 1, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_float64_reference(name, one_thread):
    shape, kw, axes = CASES[name]
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(shape, dtype=torch.float64, generator=g)
    grads = [torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(14)]
    hp = dict(lr=0.02, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, every=4, start=7)  # statistics full rank at step 7
    expected = reference_ec(w0, grads, axes=axes, p=kw.get("exponent_override", 2),  # type: ignore[arg-type]
                            rotated_m="first_moment_basis" in kw, **hp)  # fmt: skip
    w = w0.clone().requires_grad_()
    opt = Shampoo([w], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"],
                  precondition_frequency=hp["every"], start_preconditioning_step=hp["start"], block_size=8,
                  root_dtype=torch.float64, preconditioner=EC, **kw)  # fmt: skip
    for gr in grads:
        w.grad = gr.clone()
        opt.step()
    assert {k for k in opt.state[w] if k.startswith("basis.")} == {f"basis.0.{a}" for a in axes}
    assert not any(k.startswith(("root.", "graft_acc")) for k in opt.state[w])  # no roots, no grafting
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("basis", ["original", "rotated"])
def test_stacked_blocks_equal_one_bucket_per_block(basis, one_thread):
    """Equal blocks of several parameters stacked (batched) give the per-block result, bit for bit."""
    shapes = [(8, 8), (8, 8), (6, 8), (8,), (3, 4, 5)]

    def run(batched: bool) -> list[torch.Tensor]:
        params = make_params(shapes, torch.float32)
        opt = Shampoo(params, lr=1e-2, block_size=4, precondition_frequency=3, start_preconditioning_step=2,
                      preconditioner=EC, first_moment_basis=basis, batched=batched)  # fmt: skip
        step_on_random_grads(params, opt, 9)
        assert any(k.startswith("basis.") for k in opt.state[params[0]])
        return params

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- no basis: Adam
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_with_no_basis_the_update_is_adamw(dtype):
    shapes = [(6, 5), (7,), (3, 4, 5)]
    params, ref = make_params(shapes, dtype), make_params(shapes, dtype)
    opt = Shampoo(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, preconditioner=EC,
                  start_preconditioning_step=NEVER)  # fmt: skip
    adamw = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    step_on_random_grads(params, opt, 12)
    step_on_random_grads(ref, adamw, 12)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, **tol)
    assert opt.param_groups[0]["grafting"] == "none" and "graft_acc" not in opt.state[params[0]]


def test_identity_basis_is_adam(one_thread):
    """A basis that is the identity (diagonal statistics: gradients with one non-zero per
    row and column, on the diagonal) rotates nothing: the update is Adam's."""
    shapes = [(5, 5)]
    params, ref = make_params(shapes), make_params(shapes)
    opt = Shampoo(params, lr=0.01, weight_decay=0.0, preconditioner=EC, precondition_frequency=2,
                  start_preconditioning_step=1, root_dtype=torch.float64)  # fmt: skip
    adam = torch.optim.Adam(ref, lr=0.01)
    g = torch.Generator().manual_seed(2)
    scale = torch.arange(1.0, 6.0, dtype=torch.float64) * 10  # distinct eigenvalues: Q = ±I, ascending
    for _ in range(8):
        grad = torch.diag(scale * (1 + 0.1 * torch.rand(5, generator=g, dtype=torch.float64)))
        params[0].grad, ref[0].grad = grad.clone(), grad.clone()
        opt.step()
        adam.step()
    q = opt.state[params[0]]["basis.0.0"]
    torch.testing.assert_close(q.abs(), torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(params[0], ref[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- schedulers and checkpoints
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def fit(m: nn.Module, opt: Shampoo, first: int, steps: int) -> None:
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def ec_opt(m: nn.Module, scheduler=None, **kw) -> Shampoo:
    return Shampoo(m.parameters(), lr=1e-2, block_size=4, precondition_frequency=3, start_preconditioning_step=2,
                   preconditioner=EC, scheduler=scheduler, **kw)  # fmt: skip


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_deterministic_background_is_bitwise_inline(one_thread):
    inline_m, bg_m = model(), model()
    inline, bg = ec_opt(inline_m, InlineRoots(delay=2)), ec_opt(bg_m, BackgroundRoots(delay=2, workers="thread"))
    try:
        fit(inline_m, inline, 0, 14)
        fit(bg_m, bg, 0, 14)
    finally:
        bg.close()
    assert same(inline_m, bg_m)
    rows = bg.diagnostics()["blocks"]
    assert rows and all(r["has_root"] and r["method"] == "eigh/fp32" for r in rows)
    delay0 = model()
    fit(delay0, ec_opt(delay0), 0, 14)
    assert not same(delay0, inline_m)  # the delay changed something, so the equality above says something


def test_latency_background_trains_with_bounded_staleness(one_thread):
    m = model()
    opt = ec_opt(m, BackgroundRoots("latency", max_staleness=4, workers="thread"))
    try:
        fit(m, opt, 0, 14)
    finally:
        opt.close()
    rows = opt.diagnostics()["blocks"]
    assert all(r["has_root"] and r["staleness"] <= 4 + 3 for r in rows)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_state_round_trips_and_a_resumed_run_is_bitwise(one_thread):
    whole = model()
    fit(whole, ec_opt(whole, InlineRoots(delay=2)), 0, 12)

    first = model()
    opt = ec_opt(first, InlineRoots(delay=2))
    fit(first, opt, 0, 6)  # the bases computed at step 5 are pending until step 7
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["scalable_shampoo"]["scheduler"]["pending"]  # a basis still pending is in it
    state = saved["opt"]["state"][0]
    assert {"exp_avg", "exp_avg_sq", "basis.0.0", "basis.0.1"} <= set(state)

    resumed = model()
    resumed.load_state_dict(saved["model"])
    opt2 = ec_opt(resumed, InlineRoots(delay=2))
    opt2.load_state_dict(saved["opt"])
    for k, v in opt2.state[next(resumed.parameters())].items():
        if torch.is_tensor(v):
            assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    fit(resumed, opt2, 6, 6)
    assert same(resumed, whole)


def test_bf16_basis_storage_halves_the_basis_and_keeps_training(one_thread):
    full, half = model(), model()
    opt_full, opt_half = ec_opt(full), ec_opt(half, root_storage_dtype=torch.bfloat16)
    fit(full, opt_full, 0, 8)
    fit(half, opt_half, 0, 8)
    m_full, m_half = opt_full.memory(), opt_half.memory()
    assert m_full["basis"] > 0 and m_half["basis"] * 2 == m_full["basis"] and m_full["roots"] == 0
    assert m_full["second_moment"] == m_full["parameters"] and m_full["grafting"] == 0
    assert m_half["statistics"] == m_full["statistics"]
    bases = [v for s in opt_half.state.values() for k, v in s.items() if k.startswith("basis.")]
    assert bases and all(q.dtype == torch.bfloat16 for q in bases)
    assert not same(full, half)
    for a, b in zip(full.parameters(), half.parameters()):
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)


def zero1_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))  # fmt: skip
    torch.set_num_threads(1)
    m, ref = model(), model()
    opt = ec_opt(m, BackgroundRoots(delay=2, workers="thread"))  # the default group: ZeRO-1 across the ranks
    ref_opt = ec_opt(ref, InlineRoots(delay=2), process_group=None)  # one process's
    fit(m, opt, 0, 10)  # the same batches on every rank: the same gradients
    fit(ref, ref_opt, 0, 10)
    assert same(m, ref)
    owned = [p for p in m.parameters() if p in opt.state]
    bases = sum(k.startswith("basis.") for p in owned for k in opt.state[p])
    torch.save({"params": [p.detach() for p in m.parameters()], "bases": bases, "owned": len(owned),
                "pieces": sum(len(ps) for ps in opt.rows())},
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    opt.close()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_bases_split_across_ranks_equal_one_process_bitwise(tmp_path):
    """ZeRO-1 on 2 gloo processes, bases in deterministic background: each rank computes its own
    parameters' bases, and the weights equal one process's inline run with the same delay."""
    mp.spawn(zero1_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"]))
    assert all(r["bases"] > 0 for r in results)  # each rank holds (the rows of) the parameters it computes:
    assert sum(r["owned"] for r in results) == results[0]["pieces"] >= 4  # 4, and one more per split one


# ---------------------------------------------------------------- the eigenbasis and its fallbacks
def assert_eigenbasis(a: torch.Tensor, q: torch.Tensor, tol: float) -> None:
    n = a.shape[-1]
    torch.testing.assert_close(q.mT @ q, torch.eye(n, dtype=q.dtype).expand_as(q), rtol=0, atol=tol)
    d = q.mT @ a @ q
    off = d - torch.diag_embed(d.diagonal(dim1=-2, dim2=-1))
    assert float(off.abs().max()) <= tol * float(a.abs().max())


def test_eigenbasis_of_rank_deficient_and_ill_conditioned_statistics():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    rank3 = u @ u.mT  # 12×12 of rank 3
    q0 = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    cond = q0 @ torch.diag(torch.logspace(0, 12, 12, dtype=torch.float64)) @ q0.T  # κ = 1e12
    for a in (rank3, cond.unsqueeze(0)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            res = eigenbasis(a.to(dtype))
            assert bool(res.ok.all()) and res.stages[0] == f"eigh/{'fp64' if dtype == torch.float64 else 'fp32'}"
            assert bool((res.stage == 0).all()) and float(res.residual.max()) < 1e-4
            assert_eigenbasis(a.to(dtype), res.root, tol)


def test_eigenbasis_rejects_what_no_stage_can_decompose():
    a = torch.eye(4).repeat(3, 1, 1)
    a[1, 0, 0] = float("nan")
    a[2].zero_()  # a zero statistic: nothing to decompose, not a failure (λ_max = 0)
    res = eigenbasis(a)
    assert res.ok.tolist() == [True, False, False] and res.stage.tolist() == [0, -1, -1]
    assert float(res.lambda_max[2]) == 0


def test_a_basis_that_fails_the_residual_goes_to_fp64():
    """A threshold that fp32 eigh can't meet but fp64 can: the basis comes from the second stage."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, 16, generator=g)
    res = eigenbasis((u @ u.T).unsqueeze(0), max_residual=1e-10)
    assert res.ok.tolist() == [True] and res.stages[int(res.stage[0])] == "eigh/fp64"
    assert float(res.residual[0]) <= 1e-10


class FailFrom:
    """compute_fn for BackgroundRoots: every basis from step ``step`` on is rejected."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        outs = compute_roots(jobs)
        return [replace(o, ok=False, method="rejected") if o.step >= self.step else o for o in outs]


def test_a_rejected_basis_keeps_the_previous_one(one_thread):
    m = model()
    opt = ec_opt(m, BackgroundRoots(delay=0, workers="thread", compute_fn=FailFrom(5)))
    try:
        fit(m, opt, 0, 3)  # basis from step 2
        w = next(m.parameters())
        before = opt.state[w]["basis.0.0"].clone()
        fit(m, opt, 3, 6)  # steps 5 and 8 rejected
    finally:
        opt.close()
    assert torch.equal(opt.state[w]["basis.0.0"], before)
    rows = [r for r in opt.diagnostics()["blocks"] if r["param"] == 0]
    assert all(r["rejected"] == 2 and r["root_step"] == 2 and r["last_attempt_step"] == 8 for r in rows)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("kw, name", [
    (dict(preconditioner="soap"), "preconditioner"),
    (dict(preconditioner=None), "preconditioner"),
    (dict(preconditioner=EC, exponent_override=0), "exponent_override"),
    (dict(preconditioner=EC, grafting="adamm"), "grafting"),
    (dict(preconditioner=EC, root_storage_dtype=torch.int8), "root_storage_dtype"),
    (dict(preconditioner=EC, first_moment_basis="eigen"), "first_moment_basis"),
])  # fmt: skip
def test_bad_option_values_raise_naming_them(kw, name):
    with pytest.raises(ValueError, match=name) as info:
        Shampoo([torch.zeros(2, 2, requires_grad=True)], **kw)
    assert repr(next(iter(v for k, v in kw.items() if k == name))) in str(info.value)


def test_grafting_default_depends_on_the_preconditioner():
    w = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = Shampoo([{"params": [w]}, {"params": [b], "preconditioner": EC}])
    assert [g["grafting"] for g in opt.param_groups] == ["adam", "none"]
    assert [g["preconditioner"] for g in opt.param_groups] == ["root", EC]
    opt = Shampoo([w], preconditioner=EC, grafting="adam")
    assert opt.param_groups[0]["grafting"] == "adam"


def test_a_root_group_beside_an_eigenvalue_corrected_group_is_unchanged(one_thread):
    """Param groups choose their preconditioner: the root group's parameters step exactly as in
    an optimizer without the other group."""
    shapes = [(8, 8), (8, 8), (6,)]
    both, alone = make_params(shapes, torch.float32), make_params(shapes, torch.float32)
    kw = dict(lr=1e-2, block_size=4, precondition_frequency=3, start_preconditioning_step=2)
    opt = Shampoo([{"params": both[:1]}, {"params": both[1:], "preconditioner": EC}], **kw)  # type: ignore[arg-type]
    ref = Shampoo(alone[:1], **kw)  # type: ignore[arg-type]
    step_on_random_grads(both, opt, 8)
    step_on_random_grads(alone, ref, 8, drop=lambda t, i: i > 0)
    assert torch.equal(both[0], alone[0])
    assert "root.0.0" in opt.state[both[0]] and "basis.0.0" in opt.state[both[1]]
    assert "graft_acc" in opt.state[both[0]] and "exp_avg_sq" in opt.state[both[2]]
