"""Where the optimizer's bytes go: ``memory()`` against the live tensors, and the chunked engine."""

import gc
import warnings

import pytest
import torch
from conftest import make_params, step_on_random_grads
from test_batched import MODELS, run_shampoo

import scalable_shampoo.buckets as buckets
from scalable_shampoo import BackgroundRoots, InlineRoots, Shampoo

FAST = dict(precondition_frequency=3, start_preconditioning_step=2)


def live_storages() -> dict[int, int]:
    """data_ptr → bytes of the storage of every tensor the garbage collector knows."""
    out = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        except Exception:  # an object that fails isinstance or has no storage
            continue
    return out


@pytest.mark.parametrize(
    "batched, kwargs",
    [
        (True, {}),
        (False, {}),
        (True, dict(root_storage_dtype=torch.bfloat16, momentum=0.9)),
        (True, dict(scheduler=InlineRoots(delay=2))),  # roots held by the scheduler until installed
        (True, dict(preconditioner="eigenvalue_corrected")),  # bases and the second moment V
        (True, dict(packed_storage=True)),  # statistics and roots in one matrix, the masks, the "mat" scratch
        (False, dict(packed_storage=True)),
    ],
    ids=["batched", "plain", "bf16_roots_momentum", "delayed_roots", "eigenvalue_corrected", "packed", "packed_plain"],
)
def test_memory_equals_the_live_tensor_bytes_the_optimizer_holds(batched, kwargs):
    """The unique storage bytes of every live tensor, after the steps minus before the optimizer
    was built (parameters and fixed gradients already there), equal memory() within 2%."""
    torch.manual_seed(0)
    params = make_params([(64, 48), (48, 64), (64, 64), (64,), (20, 6)], torch.float32)
    for p in params:
        p.grad = torch.randn(p.shape)  # fixed: the same tensors before and after
    gc.collect()
    before = live_storages()
    opt = Shampoo(params, block_size=32, batched=batched, precondition_frequency=4, start_preconditioning_step=1,
                  **kwargs)  # fmt: skip
    for _ in range(6):  # a root recomputation at steps 1 and 5; with delay 2 the one of step 5 is pending
        opt.step()
    gc.collect()
    after = live_storages()
    held = sum(n for ptr, n in after.items() if ptr not in before)
    mem = opt.memory()
    counted = sum(v for k, v in mem.items() if k != "parameters")
    assert mem["scratch"] > 0 and mem["basis" if "preconditioner" in kwargs else "roots"] > 0
    if "preconditioner" in kwargs:
        assert mem["roots"] == 0 and mem["second_moment"] > 0
    if "scheduler" in kwargs:
        assert mem["pending_roots"] > 0
    assert abs(counted - held) <= 0.02 * held, (counted, held, mem)


def test_the_scratch_is_three_chunks_whatever_the_model():
    """Blocks of 32² in 40 parameters of 64×64 (160 blocks): the scratch is three chunks of
    CHUNK_ELEMENTS, far below the parameters' bytes."""
    params = make_params([(64, 64)] * 40, torch.float32)
    opt = Shampoo(params, block_size=32, **FAST)
    old = buckets.CHUNK_ELEMENTS
    buckets.CHUNK_ELEMENTS = 32 * 32 * 16  # 16 blocks a chunk
    try:
        step_on_random_grads(params, opt, 3)
    finally:
        buckets.CHUNK_ELEMENTS = old
    mem = opt.memory()
    (bucket,) = opt._buckets.buckets
    assert len(bucket.chunks) == 10  # 160 rows, 16 a chunk (4 parameters of 4 rows each)
    assert mem["scratch"] == 3 * 16 * 32 * 32 * 4
    assert mem["scratch"] == 0.3 * mem["parameters"]  # 48 of the 160 blocks (4 stacks of 160 before)


@pytest.mark.parametrize("name", list(MODELS))
def test_chunks_change_no_bit(name, monkeypatch):
    """The same run with every bucket in one chunk, one unit a chunk, and chunks of ~3 rows
    (tiled parameters cut along their first tile axis): bit-identical parameters and state."""
    shapes, kwargs = MODELS[name]
    runs = []
    for limit in (1 << 30, 1, 40):
        monkeypatch.setattr(buckets, "CHUNK_ELEMENTS", limit)
        runs.append(run_shampoo(shapes, True, dtype=torch.float32, **kwargs))
    cut = runs[1][1]._buckets.buckets
    assert any(len(b.chunks) > 1 for b in cut) or all(sum(m.units for m in b.members) == 1 for b in cut)
    ref_params, ref = runs[0]
    for params, opt in runs[1:]:
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q)
        for sa, sb in zip(opt.state.values(), ref.state.values()):
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


@pytest.mark.parametrize("name", ["many_equal_blocks", "mixed_shapes", "normalized_momentum_l2"])
def test_batched_equals_plain_bit_for_bit_in_float32(name, monkeypatch):
    """Stacked, chunked buckets against a bucket per block: the same bits."""
    shapes, kwargs = MODELS[name]
    monkeypatch.setattr(buckets, "CHUNK_ELEMENTS", 40)
    plain_params, plain = run_shampoo(shapes, False, dtype=torch.float32, **kwargs)
    params, opt = run_shampoo(shapes, True, dtype=torch.float32, **kwargs)
    for p, q in zip(params, plain_params):
        assert torch.equal(p, q)
    for sa, sb in zip(opt.state.values(), plain.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


def test_background_roots_are_counted_while_pending():
    params = make_params([(32, 32)] * 2, torch.float32)
    sched = BackgroundRoots("deterministic", delay=3)
    try:
        opt = Shampoo(params, block_size=32, scheduler=sched, precondition_frequency=10, start_preconditioning_step=1)
        step_on_random_grads(params, opt, 1)  # jobs submitted at step 1, installed at step 4
        held = opt.memory()["pending_roots"]
        assert held >= 4 * 32 * 32 * 4  # the 4 snapshots at least (and the roots once done)
        step_on_random_grads(params, opt, 3)
        assert opt.memory()["pending_roots"] == 0
    finally:
        sched.close()
