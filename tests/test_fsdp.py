"""FSDP2 and HSDP parameters (DTensors) across real gloo process groups.

``fsdp="lossless"`` equals one process bit for bit; ``fsdp="local"`` equals one process whose
parameters are cut into the same row chunks as the shards; each rank keeps about 1/W of the
state; a DTensor placement Shampoo can't step is refused by name.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import finish, init
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, InlineRoots

FAST = dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
STEPS = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(40, 6), nn.Linear(6, 10), nn.Linear(10, 3)
        self.c = nn.Linear(3, 2, bias=False)  # 2 rows: at W=3 one rank's shard of it is empty

    def forward(self, idx):
        y = self.b(torch.tanh(self.a(self.emb(idx).mean(1))))
        return y + self.c(y).sum(1, keepdim=True)


def build():
    torch.manual_seed(0)
    return Net()


def groups(params):
    """Three param groups of other options over the 6 tensors (emb, a.weight, a.bias, b.weight, b.bias, c)."""
    emb, aw, ab, bw, bb, c = params
    return [
        {"params": [emb], "max_preconditioner_dim": 32, "weight_decay": 0.1},  # 40×6: one-sided
        {"params": [aw, ab], "block_size": 4, "decoupled_weight_decay": False, "weight_decay": 0.01},  # L2
        {"params": [bw, bb, c], "block_size": 8, "momentum": 0.5},
    ]


def shard(model, mesh=None, **kw):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.emb, model.a, model.b):
        fully_shard(layer, mesh=mesh, **kw)
    return fully_shard(model, mesh=mesh, **kw)


def full_grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def set_grads(params, step):
    """Every rank's shard of the same whole gradients (as after FSDP's reduce-scatter), no communication."""
    from torch.distributed.tensor import distribute_tensor

    for p, full in zip(params, full_grads(step, [p.shape for p in params])):
        p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def state_bytes(opt):
    """The state's bytes: not the engine's scratch, nor root results a scheduler holds until they
    apply (a background scheduler holds its snapshots too, so they differ from ``InlineRoots``')."""
    return sum(v for k, v in opt.memory().items() if k not in ("parameters", "scratch", "pending_roots"))


def cuts(shapes, shards):
    """Row chunks of each shape, as torch.chunk (and FSDP2) cut them: (parameter, start, stop)."""
    out = []
    for i, s in enumerate(shapes):
        chunk = -(-s[0] // shards)
        out += [(i, min(k * chunk, s[0]), min((k + 1) * chunk, s[0])) for k in range(shards)]
    return out


def reference(mode, steps, shards, sched=None):
    """One process's Shampoo on the same gradients: the whole parameters ("lossless"), or each
    parameter cut into the same row chunks as the shards, each chunk a parameter ("local")."""
    model = build()
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    if mode == "lossless":
        leaves = [p.requires_grad_() for p in params]
        opt = Shampoo(groups(leaves), scheduler=sched, process_group=None, **FAST)
        for step in range(steps):
            for p, g in zip(leaves, full_grads(step, shapes)):
                p.grad = g
            opt.step()
        return [p.detach() for p in leaves], state_bytes(opt)
    pieces = [(i, a, b) for i, a, b in cuts(shapes, shards) if b > a]
    leaves = [params[i][a:b].clone().requires_grad_() for i, a, b in pieces]
    by_param = [[leaf for (i, _, _), leaf in zip(pieces, leaves) if i == j] for j in range(len(params))]
    grouped = groups([nn.Parameter(torch.zeros(1)) for _ in params])
    for g, owned in zip(grouped, ([0], [1, 2], [3, 4, 5])):
        g["params"] = [leaf for j in owned for leaf in by_param[j]]
    opt = Shampoo(grouped, scheduler=sched, process_group=None, **FAST)
    for step in range(steps):
        for (i, a, b), leaf in zip(pieces, leaves):
            leaf.grad = full_grads(step, shapes)[i][a:b].clone()
        opt.step()
    return [torch.cat([leaf.detach() for leaf in ls]) for ls in by_param], state_bytes(opt)


def received_bytes(opt):
    return sum(sh.bytes_received for sh in [opt._sharding, *opt._replicas.values()])


def run(model, mode, steps, sched=None, **kw):
    params = list(model.parameters())
    opt = Shampoo(groups(params), scheduler=sched, fsdp=mode, **FAST, **kw)
    received = []
    for step in range(steps):
        set_grads(params, step)
        before = received_bytes(opt)
        opt.step()
        received.append(received_bytes(opt) - before)
    return opt, received


def fsdp_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    init(rank, world, init_file)
    result = {}
    for mode in ("lossless", "local"):
        # lossless: deterministic background roots on their owners (= InlineRoots(delay=2) in one process)
        sched = BackgroundRoots(mode="deterministic", delay=2, workers="thread") if mode == "lossless" else None
        model = shard(build())
        opt, received = run(model, mode, STEPS, sched)
        params = list(model.parameters())
        before = [p.full_tensor() for p in params]
        set_grads(params, STEPS)
        if rank == world - 1:  # a NaN in one rank's rows only: every rank skips the step, nothing changes
            params[1].grad.to_local()[0, 0] = float("nan")
        opt.step()
        assert opt.skipped_steps == 1 and opt.global_step == STEPS
        assert all(torch.equal(p.full_tensor(), q) for p, q in zip(params, before))
        # diagnostics describe the blocks this rank keeps (a shard's under "local")
        rows = opt.diagnostics()["blocks"]
        for i, p in enumerate(params):
            stats = [k for k in opt.state.get(p, {}) if k.startswith("stat.")]
            assert sorted(f"stat.{r['block']}.{r['axis']}" for r in rows if r["param"] == i) == sorted(stats)
        result[mode] = dict(
            params=[p.full_tensor() for p in model.parameters()], state=state_bytes(opt), received=received,
            owned=[i for i, pieces in enumerate(opt.rows()) for r, *_ in pieces if r == rank], rows=opt.rows(),
            local_shapes=[tuple(p.to_local().shape) for p in model.parameters()],
        )  # fmt: skip
        opt.close()
    # bf16 compute in the forward and backward: the sharded parameters and gradients stay fp32
    model = shard(build(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = Shampoo(groups(list(model.parameters())), **FAST)
    ref = build()
    ref_opt = Shampoo(groups(list(ref.parameters())), process_group=None, **FAST)
    for step in range(4):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        idx, y = torch.randint(0, 40, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx).float(), y).backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.full_tensor()
        opt.step()
        ref_opt.step()
    result["bf16_equal"] = all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), ref.parameters()))
    result["bf16_moved"] = not all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(),
                                                                                  build().parameters()))  # fmt: skip
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finish()


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_lossless_equals_one_process_and_local_equals_the_same_cuts_bitwise(tmp_path, world):
    mp.spawn(fsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    param_bytes = sum(p.numel() * 4 for p in build().parameters())
    for mode in ("lossless", "local"):
        want, total = reference(mode, STEPS, world, InlineRoots(delay=2) if mode == "lossless" else None)
        for r in results:
            assert all(torch.equal(a, b) for a, b in zip(r[mode]["params"], want)), mode
        # each entry of state is kept once, by one rank (but the step, by every rank of a split parameter)
        split = sum(len(pieces) - 1 for pieces in results[0]["lossless"]["rows"]) if mode == "lossless" else 0
        assert sum(r[mode]["state"] for r in results) == total + 8 * split, mode
        assert mode == "local" or world == 2 or split > 0  # at 3 ranks a.weight's rows are split
    # lossless: parameters, or rows of blocks of them, to owners, every one owned; no all_gather of everything
    owned = sorted(set(i for r in results for i in r["lossless"]["owned"]))
    assert owned == list(range(6))
    assert sum(len(r["lossless"]["owned"]) > 0 for r in results) >= 2
    for r in results:
        assert 0 < max(r["lossless"]["received"]) < param_bytes  # rows of gradients in, rows of updates out
        assert r["local"]["received"] == [(world - 1) * 6 * 4] * STEPS  # local: a flag per parameter, no more
        # local: blocks cut from this rank's rows (a.weight 10×6 at block 4: rows-blocks of the shard)
        assert r["local"]["local_shapes"][1][0] < 10
    assert results[0]["bf16_equal"] and results[0]["bf16_moved"]


def many_layers():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)])


def balance_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    init(rank, world, init_file)
    out = {}
    for mode in ("lossless", "local"):
        model = many_layers()
        fully_shard(model)
        params = list(model.parameters())
        opt = Shampoo(params, block_size=8, fsdp=mode, **FAST)
        for step in range(4):
            set_grads(params, step)
            opt.step()
        out[mode] = state_bytes(opt)
        if mode == "local":  # per-shard state does not merge into one checkpoint: refused, not saved wrong
            with pytest.raises(NotImplementedError, match="fsdp='local'"):
                opt.state_dict()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def test_fsdp2_each_rank_keeps_about_one_wth_of_the_state(tmp_path):
    world = 2
    mp.spawn(balance_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    per_rank = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for mode, shards in (("lossless", 1), ("local", world)):
        # one process: whole parameters (lossless), or the 8-row halves as parameters (local)
        model = many_layers()
        leaves = [q.detach()[a:b].clone().requires_grad_() for q in model.parameters()
                  for _, a, b in cuts([q.shape], shards)]  # fmt: skip
        opt = Shampoo(leaves, block_size=8, process_group=None, **FAST)
        for _ in range(4):
            for leaf in leaves:
                leaf.grad = torch.randn(leaf.shape)
            opt.step()
        total = state_bytes(opt)
        got = [r[mode] for r in per_rank]
        assert sum(got) == total, (mode, got, total)
        assert max(got) <= 1.15 * total / world, (mode, got, total)


def hsdp_worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, init_file)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    result = {}
    for mode in ("lossless", "local"):
        model = shard(build(), mesh=mesh)
        p = model.a.weight
        assert [type(pl).__name__ for pl in p.placements] == ["Replicate", "Shard"]
        opt, received = run(model, mode, STEPS)
        result[mode] = dict(params=[p.full_tensor() for p in model.parameters()], state=state_bytes(opt),
                            received=received, owners=opt.owners(), rows=opt.rows())  # fmt: skip
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def test_hsdp_2x2_lossless_and_local_shard_within_and_split_across_replicas(tmp_path):
    world = 4
    mp.spawn(hsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for mode, shards in (("lossless", 1), ("local", 2)):
        want, total = reference(mode, STEPS, shards)
        for r in results:
            assert all(torch.equal(a, b) for a, b in zip(r[mode]["params"], want)), mode
        # every entry once over the 4 ranks: sharded within a replica group, split across the two
        split = sum(len(pieces) - 1 for pieces in results[0]["lossless"]["rows"]) if mode == "lossless" else 0
        assert sum(r[mode]["state"] for r in results) == total + 8 * split, mode  # the step: on each piece
    # local: ranks (0, 2) hold shard 0 in replicas 0 and 1, and split its work (ZeRO-1 across replicas)
    for a, b in ((0, 2), (1, 3)):
        owners = results[a]["local"]["owners"]
        assert owners == results[b]["local"]["owners"] and set(owners) == {a, b}
        assert results[a]["local"]["received"][-1] > 0
    rows = results[0]["lossless"]["rows"]
    assert all(r["lossless"]["rows"] == rows for r in results) and len({r for ps in rows for r, *_ in ps}) >= 3


def placement_worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    init(rank, world, init_file)
    mesh = init_device_mesh("cpu", (world,))
    ok = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)]))
    errors = {}
    tp = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))  # tensor parallel: column shards
    partial = nn.Parameter(DTensor.from_local(torch.ones(4, 6), mesh, [Partial()]))
    for name, bad in (("tp", tp), ("partial", partial)):
        try:
            Shampoo([ok, bad])
        except ValueError as e:
            errors[name] = str(e)
    try:
        Shampoo([ok], process_group=None)
    except ValueError as e:
        errors["no_group"] = str(e)
    # added to a working optimizer: refused, and the optimizer is as it was
    opt = Shampoo([ok], **FAST)
    ok.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)], src_data_rank=None)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[ok].items()}
    try:
        opt.add_param_group({"params": [tp]})
    except ValueError as e:
        errors["added"] = str(e)
    errors["untouched"] = len(opt.param_groups) == 1 and list(opt.state) == [ok] and all(
        torch.equal(opt.state[ok][k], v) for k, v in state.items())  # fmt: skip
    opt.step()  # and steps on
    torch.save(errors, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def test_a_dtensor_with_an_unsupported_placement_is_refused_by_name(tmp_path):
    mp.spawn(placement_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    errors = torch.load(tmp_path / "0.pt", weights_only=True)
    assert "parameter 1 " in errors["tp"] and "Shard(dim=1)" in errors["tp"] and "tensor-parallel" in errors["tp"]
    assert "parameter 1 " in errors["partial"] and "Partial(sum)" in errors["partial"]
    assert "process_group=None" in errors["no_group"] and "parameter 0 " in errors["no_group"]
    assert "parameter 1 " in errors["added"] and "Shard(dim=1)" in errors["added"]
    assert errors["untouched"] is True


def test_fsdp_mode_must_be_lossless_or_local():
    w = nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="fsdp must be 'lossless' or 'local', got 'sharded'"):
        Shampoo([w], fsdp="sharded")
    assert Shampoo([w], fsdp="local").fsdp == "local"


def local_checkpoint_worker(rank, world, init_file, out_dir, phase):
    """fsdp="local" through save_checkpoint/load_checkpoint at the same world size: "first" trains,
    saves and runs on; "resumed" (fresh processes) loads and runs the same steps, after a load
    into fsdp="lossless" was refused. At 4 ranks, HSDP on a 2×2 mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from scalable_shampoo.distributed import load_checkpoint, save_checkpoint

    init(rank, world, init_file)
    ckpt, saved_at, steps = os.path.join(out_dir, "ckpt"), 5, 8  # a root in flight at 5
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if world == 4 else None
    model = shard(build(), mesh=mesh)
    params = list(model.parameters())
    opt = Shampoo(groups(params), scheduler=InlineRoots(delay=2), fsdp="local", **FAST)
    out = {}
    if phase == "first":
        for step in range(saved_at):
            set_grads(params, step)
            opt.step()
        save_checkpoint(ckpt, model, opt)
    else:
        other = Shampoo(groups(params), fsdp="lossless", **FAST)
        before = [p.full_tensor() for p in params]
        try:
            load_checkpoint(ckpt, model, other)
        except ValueError as e:
            out["refused"] = str(e)
        out["untouched"] = not other.state and all(torch.equal(p.full_tensor(), q) for p, q in zip(params, before))
        load_checkpoint(ckpt, model, opt)
        out["pending"] = len(opt.scheduler.state_dict()["pending"])
    for step in range(saved_at, steps):
        set_grads(params, step)
        opt.step()
    out["params"] = [p.full_tensor() for p in params]
    out["state"] = {i: dict(opt.state[p]) for i, p in enumerate(params) if p in opt.state}
    out["global_step"] = opt.global_step
    torch.save(out, os.path.join(out_dir, f"{phase}{rank}.pt"))
    finish()


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_local_checkpoint_resumes_bitwise_at_the_same_world_size(tmp_path, world):
    for phase in ("first", "resumed"):
        mp.spawn(local_checkpoint_worker, args=(world, str(tmp_path / f"init_{phase}"), str(tmp_path), phase),
                 nprocs=world)  # fmt: skip
    held = []
    for rank in range(world):
        first, resumed = (torch.load(tmp_path / f"{ph}{rank}.pt", weights_only=True) for ph in ("first", "resumed"))
        assert all(torch.equal(a, b) for a, b in zip(first["params"], resumed["params"]))
        assert first["global_step"] == resumed["global_step"] == 8
        # each rank holds state of its own shards (HSDP: of those whose work it owns), as uninterrupted
        assert sorted(first["state"]) == sorted(resumed["state"])
        held += sorted(first["state"])
        for i, state in first["state"].items():
            got = resumed["state"][i]
            assert sorted(state) == sorted(got), i
            assert all(torch.equal(v, got[k]) if torch.is_tensor(v) else v == got[k] for k, v in state.items()), i
        assert resumed["pending"] > 0  # root results in flight at the checkpoint came back
        assert f"fsdp='local' state of mesh shape {(2,) if world == 2 else (2, 2)}" in resumed["refused"]
        assert "fsdp='lossless'" in resumed["refused"] and "nothing was loaded" in resumed["refused"]
        assert resumed["untouched"] is True
    assert sorted(held) == sorted(list(range(6)) * 2)  # each parameter's 2 shards, each held by one rank
