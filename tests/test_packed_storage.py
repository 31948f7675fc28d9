"""``Shampoo(packed_storage=True)``: each statistic and its inverse root in one n×n matrix
(the statistic's lower triangle with the diagonal, the root's strict upper triangle) plus the
root's diagonal. Checked against the default layout in fp64, batched against plain bit for bit,
through a real save/load and resume, in memory bytes, and on two real gloo ranks."""

import io

import pytest
import torch
from conftest import make_params, step_on_random_grads

from scalable_shampoo import Shampoo
from scalable_shampoo.kronecker import accumulate_statistics_, pack_root_, packed_statistic, unpack_root
from scalable_shampoo.state import diag_key, packed_key, root_key, stat_key

FAST = dict(precondition_frequency=3, start_preconditioning_step=2, block_size=8)
# a matrix cut in blocks, a one-sided tall matrix, a conv kernel (order 2 after merging), a bias
SHAPES = [(16, 12), (40, 6), (6, 3, 3, 3), (12,)]


def symmetric(n, seed):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T


def test_pack_and_unpack_recover_the_root_and_keep_the_statistic():
    """By hand: H and R symmetric; after pack_root_ the lower triangle is H's, and unpacking
    gives R exactly, packed_statistic gives H exactly."""
    h, r = symmetric(5, 0), symmetric(5, 1)
    packed = h.clone()
    diag = pack_root_(packed, r)
    assert torch.equal(diag, r.diagonal())
    assert torch.equal(packed.tril(), h.tril()) and torch.equal(packed.triu(1), r.triu(1))
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.equal(unpack_root(packed, diag, upper, torch.empty(5, 5, dtype=torch.float64)), r)
    assert torch.equal(packed_statistic(packed), h)


@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_packed_statistic_update_is_the_lower_triangle_of_the_full_one(beta2):
    """β₂·H + w·G₍ₐ₎G₍ₐ₎ᵀ on both axes of a stack of blocks: the packed update's lower
    triangle is the full update's, bit for bit; its strict upper triangle is untouched."""
    g = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for axis, n in ((0, 6), (1, 4)):
        h = torch.stack([symmetric(n, s).abs() for s in range(3)])
        roots = torch.stack([symmetric(n, 10 + s) for s in range(3)])
        full = accumulate_statistics_(h.clone(), g, axis, beta2)
        packed = h.clone()
        pack_root_(packed, roots)
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        accumulate_statistics_(packed, g, axis, beta2, packed=(torch.empty_like(h), upper))
        assert torch.equal(packed.tril(), full.tril())
        assert torch.equal(packed.triu(1), roots.triu(1))


def run(packed, batched=True, dtype=torch.float64, steps=9, **kw):
    params = make_params(SHAPES, dtype)
    opt = Shampoo(params, packed_storage=packed, batched=batched, **{**FAST, **kw})
    step_on_random_grads(params, opt, steps, drop=lambda t, i: t == 4 and i == 1)  # a root step without a gradient
    return params, opt


def test_packed_equals_the_default_layout_in_fp64():
    """Params after 9 steps (roots at 2, 5, 8) agree to 1e-10 with the default layout; every
    statistic and root, unpacked, agrees with the default layout's to 1e-12."""
    kw = dict(root_dtype=torch.float64)
    ref, ref_opt = run(False, **kw)
    got, opt = run(True, **kw)
    for p, q in zip(got, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
        st, ref_st = opt.state[p], ref_opt.state[q]
        assert not any(k.startswith(("stat.", "root.")) for k in st)
        stats = [k for k in ref_st if k.startswith("stat.")]
        assert len(stats) == sum(k.startswith("packed.") for k in st)
        for k in stats:
            b, a = map(int, k.split(".")[1:])
            h = ref_st[stat_key(b, a)]
            torch.testing.assert_close(packed_statistic(st[packed_key(b, a)]), h, rtol=1e-12, atol=1e-12)
            r = ref_st[root_key(b, a)]
            upper = torch.ones_like(r, dtype=torch.bool).triu(1)
            unpacked = unpack_root(st[packed_key(b, a)], st[diag_key(b, a)], upper, torch.empty_like(r))
            torch.testing.assert_close(unpacked, r, rtol=1e-12, atol=1e-12 * r.abs().max().item())


def test_packed_batched_equals_plain_bitwise():
    a, opt_a = run(True, batched=True, dtype=torch.float32)
    b, opt_b = run(True, batched=False, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(a, b):
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def test_packed_state_round_trips_and_resumes_bitwise():
    """Save after 5 steps through torch.save/torch.load, load into a fresh packed optimizer and
    go on: bit for bit the uninterrupted run."""
    full, _ = run(True, dtype=torch.float32, steps=9)
    params = make_params(SHAPES, torch.float32)
    opt = Shampoo(params, packed_storage=True, **FAST)
    step_on_random_grads(params, opt, 5, drop=lambda t, i: t == 4 and i == 1)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_params(SHAPES, torch.float32)
    with torch.no_grad():
        for p, q in zip(resumed, ckpt["params"]):
            p.copy_(q)
    opt2 = Shampoo(resumed, packed_storage=True, **FAST)
    opt2.load_state_dict(ckpt["opt"])
    g = torch.Generator().manual_seed(1)  # step_on_random_grads' stream, steps 5…8
    for t in range(9):
        grads = [torch.randn(p.shape, generator=g) for p in resumed]
        if t >= 5:
            for p, grad in zip(resumed, grads):
                p.grad = grad
            opt2.step()
    assert all(torch.equal(x, y) for x, y in zip(resumed, full))


def resume(packed_before, packed_after, steps=9, at=5, **kw):
    """``steps`` steps, with a state_dict() at step ``at`` loaded into a new optimizer of the other
    layout (fp64); returns the params, the loaded optimizer, and the saved state_dict."""
    params = make_params(SHAPES)
    opt = Shampoo(params, packed_storage=packed_before, **{**FAST, **kw})
    step_on_random_grads(params, opt, at)
    sd = opt.state_dict()
    opt2 = Shampoo(params, packed_storage=packed_after, **{**FAST, **kw})
    opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
        if t >= at:
            for p, grad in zip(params, grads):
                p.grad = grad
            opt2.step()
    return params, opt2, sd


@pytest.mark.parametrize("packed_before", [False, True])
def test_a_checkpoint_of_one_layout_loads_into_the_other(packed_before):
    """Either layout's state_dict loads into an optimizer of the other one, which keeps its own
    setting and key layout, and trains on as the uninterrupted run of either layout does (fp64,
    1e-10). Converting packed → full → packed gives back the saved tensors exactly."""
    kw = dict(root_dtype=torch.float64)
    got, opt, sd = resume(packed_before, not packed_before, **kw)
    params = make_params(SHAPES)
    ref_opt = Shampoo(params, packed_storage=packed_before, **{**FAST, **kw})
    step_on_random_grads(params, ref_opt, 9)
    for p, q in zip(got, params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    assert opt.param_groups[0]["packed_storage"] is (not packed_before)
    prefix = "stat." if packed_before else "packed."
    assert any(k.startswith(prefix) for st in opt.state.values() for k in st)
    from scalable_shampoo.state import relayout

    for st in sd["state"].values():
        back = relayout(relayout(st, not packed_before), packed_before)
        if packed_before:  # packed → full → packed: every tensor as it was
            assert back.keys() == st.keys()
            assert all(torch.equal(back[k], v) if torch.is_tensor(v) else back[k] == v for k, v in st.items())
        else:  # full → packed → full: a statistic as its lower triangle mirrored, a root as its upper one
            for k, v in st.items():
                if k.startswith("stat."):
                    assert torch.equal(back[k], v.tril() + v.tril(-1).mT)
                elif k.startswith("root."):
                    assert torch.equal(back[k], v.triu() + v.triu(1).mT)
                elif torch.is_tensor(v):
                    assert torch.equal(back[k], v), k


def test_packed_statistics_and_roots_take_n2_plus_n_numbers_per_factor():
    """memory(): ``packed`` is n² fp32 numbers per factor (the statistics' bytes of the default
    layout), ``roots`` n per factor, against 2n² in all for the default layout."""
    _, ref = run(False, dtype=torch.float32)
    _, opt = run(True, dtype=torch.float32)
    mem, ref_mem = opt.memory(), ref.memory()
    dims = [blk.shape[a] for g in opt.param_groups for p in g["params"] for blk in opt.plan(p, g).blocks
            for a in blk.axes]  # fmt: skip
    assert mem["packed"] == ref_mem["statistics"] == 4 * sum(n * n for n in dims)
    assert mem["roots"] == 4 * sum(dims) and ref_mem["roots"] == 4 * sum(n * n for n in dims)
    assert mem["statistics"] == 0


def test_packed_storage_refuses_settings_it_cannot_store():
    params = make_params([(4, 4)])
    with pytest.raises(ValueError, match="packed_storage=True does not go with root_storage_dtype=torch.bfloat16"):
        Shampoo(params, packed_storage=True, root_storage_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="packed_storage=True does not go with preconditioner='eigenvalue_corrected'"):
        Shampoo(params, packed_storage=True, preconditioner="eigenvalue_corrected")
    with pytest.raises(ValueError, match="packed_storage"):
        Shampoo(params, packed_storage=1)


def test_packed_storage_split_across_two_ranks_equals_one_process_bitwise(tmp_path):
    """ZeRO-1 at W=2 on real gloo ranks, the 64×40 weight split by rows of blocks: the same
    weights and, on each rank, exactly its rows of one process's packed state."""
    from test_zero1_rows import spawn

    results, _ = spawn(tmp_path, "packed", 2, kw=dict(packed_storage=True))
    assert len(results[0]["layout"][0]) == 2
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["ref"]))


def test_packed_background_roots_bitwise_equal_inline_with_the_same_delay():
    """Deterministic background threads hand roots of packed statistics back late; installed at
    the same step as inline's with the same delay, the run is bit for bit inline's."""
    from scalable_shampoo import BackgroundRoots, InlineRoots

    def fit(scheduler):
        params = make_params(SHAPES, torch.float32)
        opt = Shampoo(params, packed_storage=True, scheduler=scheduler, **FAST)
        step_on_random_grads(params, opt, 12)
        opt.close()
        return params, opt

    ref, ref_opt = fit(InlineRoots(delay=1))
    got, opt = fit(BackgroundRoots("deterministic", delay=1, workers="thread", num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert any(k.startswith("root_diag.") for st in opt.state.values() for k in st)
