"""The batched path (stacked equal blocks, ``buckets.py``) against the plain per-block loop."""

import io

import pytest
import torch
from conftest import make_params, run, step_on_random_grads

from scalable_shampoo import Shampoo

FAST = dict(precondition_frequency=3, start_preconditioning_step=2)

# name: (parameter shapes, Shampoo keyword arguments)
MODELS = {
    "many_equal_blocks": ([(16, 16)] * 4 + [(16,)] * 4, dict(block_size=4)),
    "mixed_shapes": ([(12, 7), (7, 12), (9, 9), (5,), (1, 8)], dict(block_size=4)),
    "one_sided_embedding": ([(40, 6), (6, 40), (6, 6)], dict(block_size=4, max_preconditioner_dim=20)),
    "conv_order_4": ([(6, 4, 3, 3), (4, 4, 3, 3), (3, 5, 2)], dict(block_size=4, merge_dims_bound=1)),
    "vectors_preconditioned": ([(10,), (10,), (3, 10)], dict(block_size=4, precondition_1d=True)),
    "sgd_grafting_beta2_1": ([(8, 8), (8, 8), (6, 8)], dict(block_size=4, betas=(0.0, 1.0), grafting="sgd")),
    "no_grafting": ([(8, 8), (6, 8)], dict(block_size=4, grafting="none", exponent_override=2)),
    "normalized_momentum_l2": (
        [(8, 8), (6, 8), (8,)],
        dict(block_size=4, grafting="normalized_rmsprop", momentum=0.9, nesterov=True, weight_decay=0.1,
             decoupled_weight_decay=False),
    ),  # fmt: skip
}


def run_shampoo(shapes, batched, steps=10, dtype=torch.float64, groups=None, **kwargs):
    def make(params):
        spec = params if groups is None else [{"params": [params[i] for i in ix], **kw} for ix, kw in groups]
        return Shampoo(spec, lr=0.01, batched=batched, **{**FAST, **kwargs})

    return run(make, shapes, steps, dtype)


def assert_close_state(a, b, **tol):
    for sa, sb in zip(a.state.values(), b.state.values()):
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                torch.testing.assert_close(sa[k], sb[k], **tol)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_matches_plain_in_float64(name):
    shapes, kwargs = MODELS[name]
    plain_params, plain = run_shampoo(shapes, False, **kwargs)
    params, opt = run_shampoo(shapes, True, **kwargs)
    assert opt._buckets.buckets, "nothing was batched"
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert_close_state(opt, plain, rtol=1e-10, atol=1e-12)
    assert any(k.startswith("root.") for s in opt.state.values() for k in s)


def test_equal_blocks_of_all_parameters_share_one_bucket_and_state_holds_views():
    shapes = [(16, 16)] * 3
    params, opt = run_shampoo(shapes, True, block_size=4)
    assert len(opt._buckets.buckets) == 1
    bucket = opt._buckets.buckets[0]
    assert bucket.rows == 48 and bucket.stats[0].shape == (48, 4, 4)
    stat = opt.state[params[1]]["stat.2.1"]
    assert stat._base is bucket.stats[1] and torch.equal(stat, bucket.stats[1][16 + 2])
    assert opt.state[params[2]]["root.15.0"]._base is bucket.roots[0]


def test_several_param_groups_with_different_hyperparameters():
    shapes = [(8, 8), (8, 8), (8, 8), (6,)]
    groups = [([0, 1], dict(block_size=4)), ([2, 3], dict(block_size=4, betas=(0.5, 0.9), grafting="adagrad"))]
    plain_params, _ = run_shampoo(shapes, False, groups=groups)
    params, opt = run_shampoo(shapes, True, groups=groups)
    assert len(opt._buckets.buckets) == 2  # same block shape, different β: not stacked together
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_bf16_parameters_keep_fp32_stacks():
    shapes = [(16, 16), (16, 16), (16,)]
    plain_params, _ = run_shampoo(shapes, False, dtype=torch.bfloat16, block_size=8)
    params, opt = run_shampoo(shapes, True, dtype=torch.bfloat16, block_size=8)
    assert opt._buckets.buckets[0].stats[0].dtype == torch.float32
    for p, q in zip(params, plain_params):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-2)


def test_parameters_without_gradients_on_some_steps():
    shapes = [(8, 8), (8, 8), (12, 8)]
    out = []
    for batched in (False, True):
        params = make_params(shapes)
        opt = Shampoo(params, lr=0.01, block_size=4, batched=batched, **FAST)
        step_on_random_grads(params, opt, 10, drop=lambda t, i: (t + i) % 3 == 0)  # a different set every step
        out.append(params)
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_for_bit(dtype):
    shapes, kwargs = [(16, 16), (16, 16), (12, 7), (16,)], dict(block_size=4, momentum=0.5)
    params, opt = run_shampoo(shapes, True, steps=7, dtype=dtype, **kwargs)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = Shampoo(params2, lr=0.01, batched=True, **{**FAST, **kwargs})
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[params2[0]]["stat.0.0"].dtype == torch.float32
    step_on_random_grads(params, opt, 6, seed=2)
    step_on_random_grads(params2, opt2, 6, seed=2)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    assert opt2.state[params2[0]]["stat.0.0"]._base is not None  # re-stacked after the load


def test_a_checkpoint_stores_each_stack_once():
    params, opt = run_shampoo([(32, 32)] * 4, True, block_size=4)
    stacks = sum(t.nbytes for b in opt._buckets.buckets for t in (*b.stats.values(), *b.roots.values()))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert stacks <= buf.tell() < stacks + 2 * sum(4 * p.numel() for p in params) + 300_000


def test_add_param_group_mid_run():
    out = []
    for batched in (False, True):
        params = make_params([(8, 8), (8, 8), (6, 8), (8, 8)])
        opt = Shampoo(params[:2], lr=0.01, block_size=4, batched=batched, **FAST)
        step_on_random_grads(params[:2], opt, 4)
        opt.add_param_group({"params": params[2:], "betas": (0.8, 0.99)})
        step_on_random_grads(params, opt, 6, seed=3)
        out.append((params, opt))
    for p, q in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert len(out[1][1]._buckets.buckets) == 3  # group 0: 4×4; group 1: 4×4 and 2×4


def test_rejected_roots_keep_the_previous_ones():
    out = []
    for batched in (False, True):
        params = make_params([(8, 8), (8, 8)])
        opt = Shampoo(params, lr=0.01, block_size=4, batched=batched, precondition_frequency=2,
                      start_preconditioning_step=1)  # fmt: skip
        step_on_random_grads(params, opt, 1)
        first = opt.state[params[1]]["root.3.1"].clone()
        opt.param_groups[0]["max_root_residual"] = 1e-300
        opt.param_groups[0]["root_retries"] = 0
        step_on_random_grads(params, opt, 4, seed=2)
        assert torch.equal(opt.state[params[1]]["root.3.1"], first)
        assert float(opt.state[params[1]]["root_info.3.1"][4]) == 2  # rejected at steps 3 and 5
        out.append(params)
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grafting", [dict(), dict(grafting="sgd", betas=(0.0, 0.9)), dict(grafting="none")])
def test_blocks_whose_first_roots_are_rejected_get_the_grafting_update(grafting):
    # Param 1's roots are all rejected (an impossible residual bound in its group): its
    # blocks have no roots, so the bucket mixes rows with and without roots.
    out = []
    for batched in (False, True):
        params = make_params([(8, 8), (8, 8)])
        groups = [{"params": [params[0]]}, {"params": [params[1]], "max_root_residual": 1e-300, "root_retries": 0}]
        opt = Shampoo(groups, lr=0.01, block_size=4, batched=batched, **FAST, **grafting)
        step_on_random_grads(params, opt, 6)
        assert "root.0.0" in opt.state[params[0]] and "root.0.0" not in opt.state[params[1]]
        out.append(params)
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
