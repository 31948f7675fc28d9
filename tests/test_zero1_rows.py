"""ZeRO-1 by blocks: ranks split a parameter by rows of blocks, and nothing changes but who computes.

``Shampoo.rows()`` cuts the rows of blocks of all plain parameters into one run per rank of
about equal cost. A parameter that straddles a cut is computed by two ranks, each keeping
the state of its own blocks and its rows of the elementwise buffers. Checked here: the
cutting itself (pure functions), then real gloo groups at W = 2 and 3 on a model that is
one large matrix and two small ones, against one process, bit for bit: the weights, each
rank's state (its rows of one process's), the consolidated ``state_dict()``, a resume
from it at another world size, and a DCP reshard 2 → 3 and 2 → 1.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import finish, init, rank_state
from test_sharded_checkpoint import set_grads  # the same gradients on every rank
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.background import InlineRoots
from scalable_shampoo.blocks import make_plan, row_units, rows_plan
from scalable_shampoo.distributed import block_cost, load_checkpoint, param_cost, row_costs, save_checkpoint, split_rows

FAST = dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2, block_size=8, momentum=0.5)
STEPS = 9
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# ---------------------------------------------------------------------- the cutting, pure
def test_rows_plan_keeps_the_blocks_of_its_rows_under_their_own_indices():
    plan = make_plan((20, 12), 8, 1024, 1024, False)  # rows 0-8, 8-16, 16-20; columns 0-8, 8-12
    assert row_units(plan) == [(0, 8), (8, 16), (16, 20)]
    sub = rows_plan(plan, 8, 20)
    assert sub.merged == (12, 12) and sub.first == 2
    assert [b.shape for b in sub.blocks] == [b.shape for b in plan.blocks[2:]]
    assert [b.axes for b in sub.blocks] == [b.axes for b in plan.blocks[2:]]
    assert [b.index[0] for b in sub.blocks] == [slice(0, 8), slice(0, 8), slice(8, 12), slice(8, 12)]
    assert rows_plan(plan, 0, 20) is plan
    # an embedding table whose vocabulary axis keeps no statistic has one unit: it is never split
    assert len(row_units(make_plan((3000, 8), 8, 1024, 1024, False))) == 1
    assert sum(c for *_, c in row_costs(plan, 3)) == param_cost(plan, 3)
    assert row_costs(plan, 3)[0][2] == sum(block_cost(b, 3) for b in plan.blocks[:2])


def test_split_rows_cuts_once_per_rank_in_order_and_balances_the_cost():
    units = [[(0, 8, 5.0), (8, 16, 5.0), (16, 20, 2.0)], [(0, 4, 1.0)], [(0, 8, 3.0), (8, 16, 3.0)]]
    for world in (1, 2, 3, 4):
        pieces = split_rows(units, world)
        ranks = [r for ps in pieces for r, *_ in ps]
        assert ranks == sorted(ranks)  # a rank's rows are one run: of each parameter one range
        for us, ps in zip(units, pieces):  # the pieces tile the rows, at unit bounds
            assert ps[0][1] == 0 and ps[-1][2] == us[-1][1]
            assert all(a[2] == b[1] for a, b in zip(ps, ps[1:]))
            assert {lo for _, lo, _ in ps} <= {lo for lo, *_ in us}
        load = [0.0] * world
        for us, ps in zip(units, pieces):
            for lo, _, c in us:
                load[next(r for r, a, b in ps if a <= lo < b)] += c
        assert max(load) <= 19 / world + 5.0 / 2  # within half the largest unit of an equal share
    assert split_rows(units, 2) == [[(0, 0, 16), (1, 16, 20)], [(1, 0, 4)], [(1, 0, 16)]]


# ---------------------------------------------------------------------- real process groups
class Net(nn.Module):
    """One large matrix and two small layers: per-parameter owners could not balance it."""

    def __init__(self):
        super().__init__()
        self.big, self.small, self.out = nn.Linear(40, 64), nn.Linear(40, 8), nn.Linear(8, 3, bias=False)


def build():
    torch.manual_seed(0)
    return Net()


def make(model, **kw):
    return Shampoo(model.parameters(), scheduler=InlineRoots(delay=2), **{**FAST, **kw})


def reference(steps, **kw):
    model = build()
    opt = make(model, process_group=None, **kw)
    for step in range(steps):
        set_grads(model, step)
        opt.step()
    return model, opt


def state_bytes(opt):
    return sum(v for k, v in opt.memory().items() if k not in ("parameters", "scratch"))


def run(rank, world, out_dir, ckpt_in=None, ckpt_out=None, save_at=None, kw=None):
    kw = kw or {}
    model = build()
    opt = make(model, **kw)
    start = 0
    if ckpt_in is not None:
        load_checkpoint(ckpt_in, model, opt)
        start = opt.global_step
    for step in range(start, STEPS):
        set_grads(model, step)
        opt.step()
        if step + 1 == save_at:
            save_checkpoint(ckpt_out, model, opt)
    ref_model, ref = reference(STEPS, **kw)
    layout = opt.rows()
    for i, pieces in enumerate(layout):
        p = list(model.parameters())[i]
        want = rank_state(ref, i, pieces, rank)
        if want is None:
            assert p not in opt.state
            continue
        got = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert got.keys() == want.keys(), (i, got.keys() ^ want.keys())
        assert all(torch.equal(got[k], want[k]) for k in want), i
    table = opt.plan_table(model)  # says who computes which rows
    assert [r["ranks"] for r in table.rows] == (layout if world > 1 else [None] * len(layout))
    text = str(table).splitlines()[2]  # big.weight's row
    assert (text.endswith(" | " + ", ".join(f"rank {r}: {lo}–{hi}" for r, lo, hi in layout[0]) + " |") if world > 1
            else "rank" not in str(table))  # fmt: skip
    sd = opt.state_dict()  # a collective: the whole state, as one process's
    ref_sd = ref.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for i, st in ref_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(sd["state"][i][k], v) if torch.is_tensor(v) else sd["state"][i][k] == v, (i, k)
    result = dict(params=[p.detach() for p in model.parameters()], ref=[p.detach() for p in ref_model.parameters()],
                  layout=layout, state_bytes=state_bytes(opt), ref_bytes=state_bytes(ref), start=start)  # fmt: skip
    if rank == 0 and ckpt_in is None:
        torch.save({"optimizer": sd, "model": model.state_dict()}, os.path.join(out_dir, "consolidated.pt"))
    opt.close()
    ref.close()
    return result


def worker(rank, world, init_file, out_dir, ckpt_in, ckpt_out, save_at, kw):
    init(rank, world, init_file)
    torch.save(run(rank, world, out_dir, ckpt_in, ckpt_out, save_at, kw), os.path.join(out_dir, f"{rank}.pt"))
    finish()


def spawn(tmp_path, name, world, ckpt_in=None, ckpt_out=None, save_at=None, kw=None):
    """Run ``run`` on ``world`` spawned ranks; ``kw``: more Shampoo settings, for every rank and the reference."""
    out = tmp_path / name
    out.mkdir()
    mp.spawn(worker, args=(world, str(out / "init"), str(out), ckpt_in, ckpt_out, save_at, kw), nprocs=world)
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)], out


@pytest.mark.parametrize("world", [2, 3])
def test_split_parameter_equals_one_process_bitwise_and_each_rank_keeps_its_share(tmp_path, world):
    results, _ = spawn(tmp_path, "run", world)
    layout = results[0]["layout"]
    assert len(layout[0]) == world  # big.weight (64×40, 8 rows of blocks) is split among all ranks
    for r in results:
        assert r["layout"] == layout
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["ref"]))
    total = results[0]["ref_bytes"]
    extra = 8 * sum(len(pieces) - 1 for pieces in layout)  # every rank of a split parameter keeps its step
    assert sum(r["state_bytes"] for r in results) == total + extra  # every other byte of state on one rank
    assert max(r["state_bytes"] for r in results) <= 1.15 * total / world


def resume_worker(rank, world, init_file, out_dir, consolidated):
    """Resume from a consolidated checkpoint saved at another world size."""
    init(rank, world, init_file)
    model = build()
    opt = make(model)
    saved = torch.load(consolidated, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for step in range(opt.global_step, STEPS + 3):
        set_grads(model, step)
        opt.step()
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"{rank}.pt"))
    finish()


def test_consolidated_state_dict_of_split_state_resumes_at_another_world_size(tmp_path):
    results, out = spawn(tmp_path, "w2", 2)
    ref_model, ref = reference(STEPS + 3)
    mp.spawn(resume_worker, args=(3, str(tmp_path / "init3"), str(tmp_path), str(out / "consolidated.pt")), nprocs=3)
    for r in range(3):
        got = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref_model.parameters()))


def test_dcp_reshard_of_split_state_2_to_3_and_1_continues_bitwise(tmp_path):
    """Saved at 2 ranks after step 4 (big.weight split between them, a root pending), resumed
    at 3 ranks (split three ways) and at 1: the weights and each rank's state are one
    uninterrupted process's (``run`` checks the state)."""
    ckpt = str(tmp_path / "ckpt")
    spawn(tmp_path, "w2", 2, ckpt_out=ckpt, save_at=4)
    results, _ = spawn(tmp_path, "w3", 3, ckpt_in=ckpt)
    assert all(r["start"] == 4 for r in results)
    assert len(results[0]["layout"][0]) == 3
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r["ref"]))
    one = run(0, 1, str(tmp_path), ckpt_in=ckpt)
    assert one["start"] == 4 and all(torch.equal(a, b) for a, b in zip(one["params"], one["ref"]))


def bf16_worker(rank, world, init_file, out_dir):
    init(rank, world, init_file)
    model = build()
    opt = make(model, communication_dtype=torch.bfloat16)
    for step in range(STEPS):
        set_grads(model, step)
        opt.step()
    torch.save({"params": [p.detach() for p in model.parameters()], "rows": opt.rows()},
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    finish()


def test_bf16_updates_of_split_rows_keep_the_ranks_identical(tmp_path):
    """With bf16 communication the owner of each run of rows applies the same rounded update as
    every other rank, so the ranks never drift apart; the run stays close to fp32's."""
    mp.spawn(bf16_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert len(r0["rows"][0]) == 2  # big.weight split between the two ranks
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    ref_model, _ = reference(STEPS)
    assert not all(torch.equal(a, b) for a, b in zip(r0["params"], ref_model.parameters()))  # rounded updates
    for a, b in zip(r0["params"], ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
