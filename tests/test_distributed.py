"""ZeRO-1 Shampoo across real gloo process groups equals the single-process run, bit for bit."""

import contextlib
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from scalable_shampoo import Shampoo
from scalable_shampoo.background import InlineRoots
from scalable_shampoo.distributed import ExchangeError, assign_owners

FAST = dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
STEPS = 10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(40, 6), nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, idx):
        return self.b(torch.tanh(self.a(self.emb(idx).mean(1))))


def build():
    torch.manual_seed(0)
    return Net()


def groups(m):
    return [
        {"params": [m.emb.weight], "max_preconditioner_dim": 32},  # 40×6: one-sided, d side only
        {"params": m.a.parameters(), "block_size": 4},  # 10×6 in 3×2 blocks
        {"params": m.b.parameters(), "block_size": 8},  # 3×10 in 1×2 blocks
    ]


def init(rank, world, init_file):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)


def finish():
    """Leave the group together, then exit without Python's teardown: gloo's threads can
    abort a process ("terminate called without an active exception") if a peer leaves first."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def scheduler(mode):
    if mode == "inline":
        return None, None
    from scalable_shampoo.background import BackgroundRoots

    return BackgroundRoots(mode="deterministic", delay=2, workers="thread"), InlineRoots(delay=2)


def rank_state(ref, index, pieces, rank):
    """What ``rank`` keeps (its tensors) of one process's state ``ref`` of parameter ``index``,
    of which it computes ``pieces`` (``Shampoo.rows()``): everything, nothing (None), or of
    its rows ``lo … hi-1``: the entries of the blocks inside them, those rows of the
    elementwise buffers (of the parameter viewed as its merged matrix) and the step."""
    mine = [(lo, hi) for r, lo, hi in pieces if r == rank]
    if not mine:
        return None
    q, group = [(p, g) for g in ref.param_groups for p in g["params"]][index]
    state = {k: v for k, v in ref.state[q].items() if torch.is_tensor(v)}
    if len(pieces) == 1:
        return state
    (lo, hi), plan = mine[0], ref.plan(q, group)
    inside = {b for b, blk in enumerate(plan.blocks) if lo <= blk.index[0].start and blk.index[0].stop <= hi}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) == 3:  # a block's entry: stat.b.a, root.b.a, root_info.b.a, ...
            if int(parts[1]) in inside:
                out[k] = v
        elif k == "step":
            out[k] = v
        else:
            out[k] = v.reshape(plan.merged)[lo:hi]
    return out


def state_bytes(opt):
    """Bytes of optimizer state, each storage once (stacked statistics and roots included)."""
    return sum(v for k, v in opt.memory().items() if k not in ("parameters", "scratch"))


def ddp_worker(rank, world, init_file, mode, out_dir):
    init(rank, world, init_file)
    model, ref = DDP(build()), build()
    sched, ref_sched = scheduler(mode)
    opt = Shampoo(groups(model.module), scheduler=sched, **FAST)  # the default group shares the work
    ref_opt = Shampoo(groups(ref), scheduler=ref_sched, process_group=None, **FAST)  # one process's Shampoo
    layout = opt.rows()
    assert len({r for pieces in layout for r, *_ in pieces}) >= 2  # the work is split
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard of the batch
        idx, y = torch.randint(0, 40, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx), y).backward()  # DDP averages the gradients
        for p, q in zip(model.module.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.module.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    for i, p in enumerate(model.module.parameters()):
        want = rank_state(ref_opt, i, layout[i], rank)
        if want is None:  # ZeRO-1: no state at all for another rank's parameter
            assert p not in opt.state
            continue
        got = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    roots = [k for st in opt.state.values() for k in st if k.startswith("root.")]
    torch.save(
        {"params": [p.detach() for p in model.module.parameters()], "bytes": opt._sharding.bytes_received,
         "state_bytes": state_bytes(opt), "ref_state_bytes": state_bytes(ref_opt), "roots": len(roots)},
        os.path.join(out_dir, f"{rank}.pt"),
    )  # fmt: skip
    opt.close()
    ref_opt.close()
    finish()


@pytest.mark.parametrize("world,mode", [(2, "inline"), (3, "inline"), (2, "deterministic")])
def test_ddp_zero1_equals_single_process_bitwise(tmp_path, world, mode):
    mp.spawn(ddp_worker, args=(world, str(tmp_path / "init"), mode, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], results[0]["params"]))
    assert all(r["bytes"] > 0 for r in results)
    assert sum(r["state_bytes"] for r in results) == results[0]["ref_state_bytes"]  # each entry kept once
    assert sum(r["roots"] > 0 for r in results) >= 2  # roots computed on more than one rank


def many_layers():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)])


def balance_worker(rank, world, init_file, out_dir):
    init(rank, world, init_file)
    model = many_layers()
    opt = Shampoo(model.parameters(), block_size=8, **FAST)
    for step in range(4):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    torch.save(state_bytes(opt), os.path.join(out_dir, f"{rank}.pt"))
    finish()


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_keeps_about_one_wth_of_the_state(tmp_path, world):
    mp.spawn(balance_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    per_rank = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    model = many_layers()
    opt = Shampoo(model.parameters(), block_size=8, process_group=None, **FAST)
    for step in range(4):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    total = state_bytes(opt)
    assert sum(per_rank) == total
    assert max(per_rank) <= 1.15 * total / world, (per_rank, total)


def dying_worker(rank, world, init_file, out_dir):
    init(rank, world, init_file)
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = Shampoo([w], **FAST)
    try:
        for step in range(STEPS):
            if rank == 1 and step == 3:  # dies without a word, before its 4th step
                with open(os.path.join(out_dir, "killed.txt"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            w.grad = torch.randn(6, 6, generator=torch.Generator().manual_seed(step))
            opt.step()
    except ExchangeError as e:
        with open(os.path.join(out_dir, "error.txt"), "w") as f:
            f.write(f"{time.time()!r} {e}")
        os._exit(0)  # the group is broken: leave without running its destructors


def test_a_dead_rank_gives_the_others_a_clear_error_at_once(tmp_path):
    # not mp.spawn: it would terminate rank 0 as soon as it saw rank 1 die
    ctx = mp.start_processes(dying_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    survivor, dead = ctx.processes
    survivor.join(120)
    dead.join(10)
    assert dead.exitcode == -signal.SIGKILL
    assert survivor.exitcode == 0
    killed = float((tmp_path / "killed.txt").read_text())
    raised, message = (tmp_path / "error.txt").read_text().split(" ", 1)
    assert "sharing updates at step 4 failed on rank 0" in message
    # gloo: the survivor raises when the dead rank's connection closes, not at the 30 s timeout
    delay = float(raised) - killed
    print(f"the survivor raised {delay:.2f} s after the SIGKILL")
    assert delay < 5, delay


def test_assign_owners_is_deterministic_and_balanced():
    costs = [128.0, 64, 64, 32, 256, 8, 8, 128, 16]
    for world in (1, 2, 3, 4, 16):
        owners = assign_owners(costs, world)
        assert owners == assign_owners(list(costs), world)
        assert all(0 <= o < world for o in owners)
        load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert max(load) - min(load) <= max(costs)  # greedy LPT bound
    assert assign_owners([4, 4], 5) == [0, 1]  # more ranks than items: the rest own nothing
    assert assign_owners([], 3) == []
    assert assign_owners([8, 512, 8, 8], 2) == [1, 0, 1, 1]  # by cost, not by count


def test_param_cost_counts_statistics_preconditioning_roots_and_elementwise_work():
    from scalable_shampoo.blocks import make_plan
    from scalable_shampoo.distributed import param_cost

    plan = make_plan((8, 4), 1024, 4096, 1024, False)  # one 8×4 block, both axes
    assert param_cost(plan, 10) == 2 * 32 * (8 + 4) + (8**3 + 4**3) / 10 + 32
    assert param_cost(make_plan((5,), 1024, 4096, 1024, False), 10) == 5  # a vector: elementwise only


def fsdp_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    init(rank, world, init_file)
    model, ref = build(), build()
    for layer in (model.emb, model.a, model.b):
        fully_shard(layer)
    fully_shard(model)
    assert type(model.a.weight).__name__ == "DTensor"
    opt = Shampoo(groups(model), **FAST)
    ref_opt = Shampoo(groups(ref), process_group=None, **FAST)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        idx, y = torch.randint(0, 40, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx), y).backward()  # FSDP2 reduce-scatters the gradients
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.full_tensor()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.full_tensor(), q)  # sharded Shampoo is lossless
    if opt.owners()[1] == rank:  # a.weight's owner keeps its roots; the others keep nothing of it
        assert any(k.startswith("root.") for k in opt.state[model.a.weight])
    else:
        assert model.a.weight not in opt.state
    finish()


def test_fsdp2_sharded_parameters_equal_unsharded_shampoo_bitwise(tmp_path):
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)


def set_grads(model, step):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for i, p in enumerate(model.parameters()):
        full = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = full


def sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = build()
    for layer in (model.emb, model.a, model.b):
        fully_shard(layer)
    return fully_shard(model)


def dcp_worker(rank, world, init_file, ckpt, phase, out):
    from scalable_shampoo.distributed import load_checkpoint, save_checkpoint

    init(rank, world, init_file)
    model = sharded_model()
    opt = Shampoo(groups(model), **FAST)
    if phase == "save":
        for step in range(5):
            set_grads(model, step)
            opt.step()
        save_checkpoint(ckpt, model, opt)
    else:
        load_checkpoint(ckpt, model, opt)
        assert opt.global_step == 5
        for step in range(5, 10):
            set_grads(model, step)
            opt.step()
        full = [p.full_tensor() for p in model.parameters()]
        if rank == 0:
            torch.save(full, out)
    finish()


def test_dcp_checkpoint_saved_at_world_2_resumes_at_world_1_and_3_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(dcp_worker, args=(2, str(tmp_path / "i2"), ckpt, "save", None), nprocs=2)
    ref = build()
    ref_opt = Shampoo(groups(ref), process_group=None, **FAST)
    for step in range(10):
        set_grads(ref, step)
        ref_opt.step()
    for world in (1, 3):
        out = str(tmp_path / f"w{world}.pt")
        mp.spawn(dcp_worker, args=(world, str(tmp_path / f"i{world}"), ckpt, "load", out), nprocs=world)
        got = torch.load(out, weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref.parameters()))


def killed_and_restarted(worker, tmp_path, out):
    """Run ``tests/<worker> CKPT_DIR OUT`` on 2 ranks under ``torchrun --max-restarts 2``; assert
    that rank 1 was SIGKILLed, torchrun restarted the group, and the run then finished."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--monitor-interval", "0.5",
        os.path.join(os.path.dirname(__file__), worker), str(tmp_path), str(out),
    ]  # fmt: skip
    # lazy gloo connections: a restarted rank that starts slowly is not refused
    env = {**os.environ, "TORCH_GLOO_LAZY_INIT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr  # rank 1 was SIGKILLed, and torchrun restarted the group


def test_torchrun_restarts_after_sigkill_and_resumes_bitwise(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import torchrun_worker as w

    out = tmp_path / "final.pt"
    killed_and_restarted("torchrun_worker.py", tmp_path, out)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    ref_opt = Shampoo(ref.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
    for step in range(w.STEPS):
        w.grads(ref, step)
        ref_opt.step()
    got = torch.load(out, weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref.parameters()))


def resume_worker(rank, world, init_file, phase, ckpt, out):
    init(rank, world, init_file)
    model = build()
    opt = Shampoo(groups(model), scheduler=InlineRoots(delay=2), **FAST)
    start = 0
    if phase == "load":
        saved = torch.load(ckpt, weights_only=True)
        with torch.no_grad():
            for p, q in zip(model.parameters(), saved["params"]):
                p.copy_(q)
        opt.load_state_dict(saved["opt"])
        start = 5
    for step in range(start, STEPS):
        set_grads(model, step)
        opt.step()
        if phase == "save" and step == 4:  # after step 5: the roots of step 5 are due at step 7
            sd = opt.state_dict()  # a collective: every rank calls it, each gets the whole state
            assert sd["scalable_shampoo"]["scheduler"]["pending"], "nothing was pending"
            if rank == 0:
                torch.save({"opt": sd, "params": [p.detach().clone() for p in model.parameters()]}, ckpt)
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out)
    finish()


@pytest.mark.parametrize("world", [2, 3])
def test_rank0_checkpoint_with_delayed_roots_resumes_on_every_rank_bitwise(tmp_path, world):
    """Saved on rank 0 at world size 2 mid-delay, resumed at ``world``: each rank takes its own
    parameters' state and pending roots, and the run continues as one uninterrupted process."""
    ckpt = str(tmp_path / "opt.pt")
    mp.spawn(resume_worker, args=(2, str(tmp_path / "i1"), "save", ckpt, str(tmp_path / "a.pt")), nprocs=2)
    mp.spawn(resume_worker, args=(world, str(tmp_path / "i2"), "load", ckpt, str(tmp_path / "b.pt")), nprocs=world)
    ref = build()
    ref_opt = Shampoo(groups(ref), scheduler=InlineRoots(delay=2), process_group=None, **FAST)
    for step in range(STEPS):
        set_grads(ref, step)
        ref_opt.step()
    for name in ("a.pt", "b.pt"):
        got = torch.load(tmp_path / name, weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref.parameters())), name


def bf16_worker(rank, world, init_file, out_dir):
    init(rank, world, init_file)
    result = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = build()
        opt = Shampoo(groups(model), communication_dtype=dtype, **FAST)
        for step in range(STEPS):
            set_grads(model, step)
            opt.step()
        result[name] = ([p.detach() for p in model.parameters()], opt._sharding.bytes_received)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finish()


def test_bf16_communication_halves_the_bytes_and_keeps_the_ranks_identical(tmp_path):
    mp.spawn(bf16_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    for name in ("fp32", "bf16"):
        assert all(torch.equal(a, b) for a, b in zip(r0[name][0], r1[name][0]))  # the ranks never drift apart
    assert r0["bf16"][1] * 2 == r0["fp32"][1]
    ref = build()
    ref_opt = Shampoo(groups(ref), process_group=None, **FAST)
    for step in range(STEPS):
        set_grads(ref, step)
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(r0["fp32"][0], ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(r0["bf16"][0], ref.parameters()))  # rounded updates
    for a, b in zip(r0["bf16"][0], ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_two_torchrun_nodes_of_two_processes_equal_one_process_bitwise(tmp_path):
    """The README's multi-node command, as written, with two agents on this machine as two nodes."""
    import socket
    import subprocess
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import multinode_worker as w

    def launch():
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               os.path.join(os.path.dirname(__file__), "multinode_worker.py"), str(out)]  # fmt: skip
        env = {**os.environ, "TORCH_GLOO_LAZY_INIT": "1"}
        nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True) for _ in range(2)]  # fmt: skip
        try:
            errs = [node.communicate(timeout=180)[1] for node in nodes]
        except subprocess.TimeoutExpired:  # an agent hung: stop both, with their workers
            for node in nodes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
            return [(None, node.communicate()[1]) for node in nodes]
        return [(node.returncode, err) for node, err in zip(nodes, errs)]

    out = tmp_path / "out.pt"
    for attempt in range(2):
        results = launch()
        # Two torchrun failures that are not ours, each relaunched once:
        # - its known teardown race (pytorch/pytorch#69197): the agent that hosts the rendezvous store
        #   may exit once its own workers are done while the other agent still polls the store; training
        #   had finished (the output is written);
        # - an agent that hangs (seen once under a loaded machine): the workers' process group has a
        #   60 s timeout, so a collective of ours fails within a minute rather than hang for three.
        race = any(rc != 0 and "num_nodes_waiting" in err and "RendezvousConnectionError" in err for rc, err in results)
        hung = any(rc is None for rc, _ in results)
        if attempt or not ((race and out.exists()) or hung):
            break
        out.unlink(missing_ok=True)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 4 and got["nodes"] == 2 and got["owned"] == got["pieces"] >= 6
    ref = w.build()
    ref_opt = Shampoo(ref.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
    for step in range(w.STEPS):
        w.grads(ref, step)
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(got["params"], ref.parameters()))
