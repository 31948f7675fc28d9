"""Sharded checkpoints (``distributed.save_checkpoint``/``load_checkpoint``) and refusing
checkpoints that don't fit.

Under ZeRO-1 each rank writes only the state of the parameters it owns, under global
keys; a load at another world size assigns owners anew and each rank reads only its
new parameters' state. Checked with real gloo process groups (4 → 2 → 1 and 3) against
one uninterrupted process, bit for bit, with root results pending at each checkpoint.
A checkpoint of another model or of settings that lay out the state otherwise is
refused with a ``ValueError`` naming what differs, and nothing is loaded.
"""

import copy
import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from sharded_torchrun_worker import layout
from test_distributed import finish, init, killed_and_restarted, rank_state
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from scalable_shampoo import Shampoo
from scalable_shampoo.background import InlineRoots
from scalable_shampoo.distributed import META_KEY, load_checkpoint, save_checkpoint

FAST = dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
STEPS = 12
# DCP without a process group saves and loads as one process, and says so
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.a = nn.Embedding(40, 6), nn.Linear(6, 10)
        self.b, self.c = nn.Linear(10, 12), nn.Linear(12, 3)


def build():
    torch.manual_seed(0)
    return Net()


def groups(m, **changed):
    """Four groups whose state differs in layout: a one-sided embedding, momentum, β₁ = 0, SGD grafting."""
    out = [
        {"params": [m.emb.weight], "max_preconditioner_dim": 32},  # 40×6: the d side only
        {"params": list(m.a.parameters()), "block_size": 4, "momentum": 0.5},  # 10×6 in 3×2 blocks
        {"params": list(m.b.parameters()), "block_size": 8, "betas": (0.0, 0.99)},  # no first moment
        {"params": list(m.c.parameters()), "grafting": "sgd"},  # no grafting accumulator
    ]
    for i, settings in changed.items():
        out[int(i[1:])].update(settings)  # g1={...}: group 1's settings changed
    return out


def make(model, **kw):
    return Shampoo(groups(model), scheduler=InlineRoots(delay=2), **{**FAST, **kw})


def set_grads(model, step):
    for i, p in enumerate(model.parameters()):  # the same on every rank, as after DDP's all-reduce
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))


def reference(steps):
    model = build()
    opt = make(model, process_group=None)
    for step in range(steps):
        set_grads(model, step)
        opt.step()
    return model, opt


class RecordingReader(FileSystemReader):
    """DCP's file system reader, noting the keys that this rank reads."""

    def __init__(self, path):
        super().__init__(path)
        self.read = []

    def read_data(self, plan, planner):
        self.read += [item.storage_index.fqn for item in plan.items]
        return super().read_data(plan, planner)


def params_of(keys, kind="state"):
    return {int(k.split(".")[2]) for k in keys if k.startswith(f"optimizer.{kind}.")}


def state_of(opt, model):
    """Every tensor of the optimizer's state, by (parameter index, key)."""
    index = {p: i for i, p in enumerate(model.parameters())}
    return {(index[p], k): v for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}


def reshard_worker(rank, world, init_file, load_from, save_at, save_to, out_dir):
    init(rank, world, init_file)
    torch.save(resume(rank, load_from, save_at, save_to), os.path.join(out_dir, f"{rank}.pt"))
    finish()


def resume(rank, load_from, save_at, save_to):
    """Load ``load_from`` (if any), train to ``save_at`` and save to ``save_to`` (if any), train
    to STEPS; returns what the test checks."""
    model = build()
    opt = make(model)
    start, result = 0, {}
    lay = layout(opt)
    mine = {i for i, pieces in enumerate(lay["rows"]) if any(r == rank for r, *_ in pieces)}
    if load_from is not None:
        # settings that lay out the state otherwise: refused before the model or the optimizer changes
        wrong = Shampoo(groups(model, g1={"block_size": 2}), scheduler=InlineRoots(delay=2), **FAST)
        weights = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"param group 1 has block_size=4 in the checkpoint, 2 here"):
            load_checkpoint(load_from, model, wrong)
        assert not wrong.state and wrong.global_step == 0 and wrong.param_groups[1]["block_size"] == 2
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        reader = RecordingReader(load_from)
        load_checkpoint(load_from, model, opt, storage_reader=reader)
        start = opt.global_step
        result["read"] = reader.read
        result["loaded"] = {p_i for p_i, _ in state_of(opt, model)}
        result["pending_loaded"] = [o["key"] for e in opt.scheduler.state_dict()["pending"] for o in e["outcomes"]]
    assert opt.rows() == lay["rows"]  # as assigned for this world size before the load
    for step in range(start, STEPS):
        set_grads(model, step)
        opt.step()
        if step + 1 == save_at:
            result["pending_saved"] = [o["key"] for e in opt.scheduler.state_dict()["pending"] for o in e["outcomes"]]
            save_checkpoint(save_to, model, opt)
    result.update(layout=lay, mine=mine, params=[p.detach() for p in model.parameters()],
                  state=state_of(opt, model), start=start, rank=rank)  # fmt: skip
    return result


def spawn(tmp_path, name, world, load_from=None, save_at=None, save_to=None):
    out = tmp_path / name
    out.mkdir()
    args = (world, str(out / "init"), load_from, save_at, save_to, str(out))
    mp.spawn(reshard_worker, args=args, nprocs=world)
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]


def check_writers(ckpt, layout):
    """Each optimizer entry was written by the one rank that computes it (DCP: one file per
    rank): a parameter's owner, or where ranks split it by rows, the rank of the entry's
    rows (``rows{lo}-{hi}`` entries), of its block, or of the first rows (the step)."""
    md = FileSystemReader(ckpt).read_metadata()
    files = {}
    for index, info in md.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    written = {k for k in files if k.startswith("optimizer.")}
    assert META_KEY in written
    for key in written - {META_KEY}:
        _, _, i, rest = key.split(".", 3) + [""] * (key.count(".") < 3)
        pieces = layout["rows"][int(i)]
        head = rest.split(".")[0]
        if head.startswith("rows"):
            row = int(head[4:].split("-")[0])
        elif rest.count(".") == 2:  # a block's entry
            row = layout["block_rows"][int(i)][int(rest.split(".")[1])]
        else:
            row = 0
        writer = next(r for r, lo, hi in pieces if lo <= row < hi or lo == row == hi)
        assert files[key] == {f"__{writer}_0.distcp"}, (key, files[key], writer)
    return written


def test_dcp_reshard_4_to_2_to_1_and_3_reads_only_owned_state_and_continues_bitwise(tmp_path):
    """Saved at 4 ranks after step 5 and resumed at 2, saved again after step 9 and resumed
    at 3 and at 1: each rank wrote and read only its own parameters' state and pending roots,
    and every run ends with the weights and state of one uninterrupted process."""
    ref_model, ref_opt = reference(STEPS)
    ref_state = state_of(ref_opt, ref_model)
    ckpt4, ckpt2 = str(tmp_path / "ckpt4"), str(tmp_path / "ckpt2")
    # after step 5 (roots of step 5 pending until step 7), after step 9 (roots of step 8 pending until 10)
    runs = {4: spawn(tmp_path, "w4", 4, save_at=5, save_to=ckpt4)}
    runs[2] = spawn(tmp_path, "w2", 2, load_from=ckpt4, save_at=9, save_to=ckpt2)
    runs[3] = spawn(tmp_path, "w3", 3, load_from=ckpt2)
    runs[1] = [resume(0, ckpt2, None, None)]  # world size 1: this process, without a process group
    for ckpt, saved in ((ckpt4, runs[4]), (ckpt2, runs[2])):
        written = check_writers(ckpt, saved[0]["layout"])
        assert params_of(written) == set(range(7))  # every parameter has state
        assert sum(bool(r["pending_saved"]) for r in saved) >= 2  # pending roots on several ranks
        # each rank's pending results are its own parameters' only
        assert all({k[0] for k in r["pending_saved"]} <= r["mine"] for r in saved)
    assert any(len(pieces) > 1 for r in runs.values() for pieces in r[0]["layout"]["rows"])  # rows split too
    for world, results in runs.items():
        rows = results[0]["layout"]["rows"]
        blocks = []
        for r in results:
            assert r["layout"]["rows"] == rows
            assert all(torch.equal(a, b) for a, b in zip(r["params"], ref_model.parameters())), world
            for i, pieces in enumerate(rows):  # this rank's part of the state an uninterrupted process has
                want = rank_state(ref_opt, i, pieces, r["rank"]) or {}
                got = {k: v for (j, k), v in r["state"].items() if j == i}
                assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items()), (world, i)
            blocks += [(i, k) for i, k in r["state"] if k.count(".") == 2]
            if world != 4:  # a loaded run: this rank read its own parameters' state, no other's
                assert r["start"] == (5 if world == 2 else 9)
                assert params_of(r["read"]) == r["mine"] == r["loaded"], (world, r["mine"])
                assert params_of(r["read"], "extra") == r["mine"]
                assert {k[0] for k in r["pending_loaded"]} <= r["mine"]
        assert sorted(blocks) == sorted(k for k in ref_state if k[1].count(".") == 2)  # each block's on one rank
        if world != 4:
            assert sum(len(r["pending_loaded"]) for r in results) > 0
    assert len(runs[3][0]["mine"]) < 7 and len(runs[1][0]["mine"]) == 7


# ---------------------------------------------------------------------- one process, no process group
def trained(steps=5, **kw):
    model = build()
    opt = make(model, **kw)
    for step in range(steps):
        set_grads(model, step)
        opt.step()
    return model, opt


def test_dcp_checkpoint_in_one_process_continues_bitwise_with_pending_roots(tmp_path):
    model, opt = trained()
    assert opt.scheduler.state_dict()["pending"]
    save_checkpoint(str(tmp_path / "c"), model, opt)
    resumed = build()
    resumed_opt = make(resumed)
    load_checkpoint(str(tmp_path / "c"), resumed, resumed_opt)
    for step in range(5, STEPS):
        for m, o in ((model, opt), (resumed, resumed_opt)):
            set_grads(m, step)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert state_of(opt, model).keys() == state_of(resumed_opt, resumed).keys()
    assert all(torch.equal(v, state_of(resumed_opt, resumed)[k]) for k, v in state_of(opt, model).items())


def test_a_dcp_checkpoint_of_the_earlier_layout_still_loads(tmp_path):
    """The previous save_checkpoint wrote the whole optimizer state_dict as one object."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, opt = trained()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    dcp.save({"model": get_model_state_dict(model), "optimizer": buf}, checkpoint_id=str(tmp_path / "old"))
    wrong_model, wrong = other({"g1": {"block_size": 5}})
    before = snapshot(wrong_model, wrong)
    with pytest.raises(ValueError, match=r"param group 1 has block_size=4 in the checkpoint, 5 here"):
        load_checkpoint(str(tmp_path / "old"), wrong_model, wrong)
    assert_unchanged(before, wrong_model, wrong)  # the model too: the optimizer is checked first
    resumed = build()
    resumed_opt = make(resumed)
    load_checkpoint(str(tmp_path / "old"), resumed, resumed_opt)
    for step in range(5, 9):
        for m, o in ((model, opt), (resumed, resumed_opt)):
            set_grads(m, step)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.param_groups),
            {k: v.clone() for k, v in state_of(opt, model).items()}, opt.global_step)  # fmt: skip


def assert_unchanged(before, model, opt):
    weights, param_groups, state, step = before
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert opt.global_step == step
    for g, h in zip(opt.param_groups, param_groups):
        assert all(g[k] is h[k] or g[k] == h[k] for k in g if k != "params"), (g, h)
    now = state_of(opt, model)
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# settings that lay out the state otherwise, and the message naming them (saved vs now)
LAYOUT = [
    ({"g1": {"block_size": 5}}, r"param group 1 has block_size=4 in the checkpoint, 5 here"),
    ({"g0": {"max_preconditioner_dim": 64}}, r"param group 0 has max_preconditioner_dim=32 in the checkpoint, 64"),
    ({"g0": {"precondition_axes": (0,)}}, r"param group 0 has precondition_axes=None in the checkpoint, \(0,\) here"),
    ({"g1": {"precondition_1d": True}}, r"param group 1 has precondition_1d=False in the checkpoint, True here"),
    (
        {"g2": {"betas": (0.9, 0.99)}},
        r"param group 2 has betas\[0\]=0.0 in the checkpoint \(no exp_avg\), "
        r"betas\[0\]=0.9 here \(exp_avg kept\)",
    ),
    ({"g3": {"grafting": "adam"}}, r"param group 3 has grafting='sgd' in the checkpoint \(no graft_acc\)"),
    (
        {"g1": {"momentum": 0.0}},
        r"param group 1 has momentum=0.5 in the checkpoint \(momentum_buffer kept\), "
        r"momentum=0.0 here",
    ),
]
LAYOUT_IDS = ["block_size", "max_preconditioner_dim", "precondition_axes", "precondition_1d", "beta1", "grafting",
              "momentum"]  # fmt: skip


def other(changed, steps=2):
    """An optimizer of other settings (and lr) that has taken steps of its own."""
    model = build()
    opt = Shampoo(groups(model, **changed), scheduler=InlineRoots(delay=2), **{**FAST, "lr": 3e-3})
    for step in range(steps):
        set_grads(model, 50 + step)
        opt.step()
    return model, opt


@pytest.mark.parametrize("changed,message", LAYOUT, ids=LAYOUT_IDS)
def test_a_state_dict_of_settings_that_lay_out_the_state_otherwise_is_refused_and_nothing_loads(changed, message):
    _, opt = trained(steps=3)
    model, target = other(changed)
    before = snapshot(model, target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(opt.state_dict())
    assert_unchanged(before, model, target)


@pytest.mark.parametrize("changed,message", LAYOUT[:1] + LAYOUT[4:5], ids=LAYOUT_IDS[:1] + LAYOUT_IDS[4:5])
def test_a_dcp_checkpoint_of_other_settings_is_refused_and_neither_model_nor_optimizer_changes(
    tmp_path, changed, message
):
    model, opt = trained(steps=3)
    save_checkpoint(str(tmp_path / "c"), model, opt)
    model, target = other(changed)
    before = snapshot(model, target)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(str(tmp_path / "c"), model, target)
    assert_unchanged(before, model, target)


class Wider(Net):
    def __init__(self):
        super().__init__()
        self.b, self.c = nn.Linear(10, 13), nn.Linear(13, 3)


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter_and_shapes(tmp_path):
    model, opt = trained(steps=3)
    save_checkpoint(str(tmp_path / "c"), model, opt)
    torch.manual_seed(1)
    wider = Wider()
    target = Shampoo(groups(wider), scheduler=InlineRoots(delay=2), **FAST)
    set_grads(wider, 0)
    target.step()
    before = snapshot(wider, target)
    with pytest.raises(ValueError, match=r"another model: parameter 3 \(param group 2\) has shape \(12, 10\) "
                                         r"in the checkpoint, \(13, 10\) here"):  # fmt: skip
        load_checkpoint(str(tmp_path / "c"), wider, target)
    assert_unchanged(before, wider, target)
    with pytest.raises(ValueError, match=r"does not fit parameter 3 of shape \(13, 10\): graft_acc has shape "
                                         r"\(12, 10\)"):  # fmt: skip
        target.load_state_dict(opt.state_dict())
    assert_unchanged(before, wider, target)
    fewer = build()
    target = Shampoo(groups(fewer)[:3], **FAST)  # the last group left out
    with pytest.raises(ValueError, match=r"different param groups than this optimizer: \[1, 2, 2, 2\] parameters "
                                         r"per group in the checkpoint, \[1, 2, 2\] here"):  # fmt: skip
        target.load_state_dict(opt.state_dict())
    assert not target.state


def test_state_of_another_dtype_is_refused():
    model, opt = trained(steps=3)
    sd = opt.state_dict()
    wide = build().double()
    target = make(wide)
    with pytest.raises(ValueError, match=r"parameter 0 of dtype torch.float64: exp_avg has dtype torch.float32, "
                                         r"expected torch.float64"):  # fmt: skip
        target.load_state_dict(sd)
    assert not target.state


def test_settings_that_keep_the_layout_are_taken_from_the_checkpoint_as_torch_optim_does(tmp_path):
    """lr, ε, β₂, weight decay, root settings and a block size that cuts no parameter otherwise load."""
    model, opt = trained(steps=3)
    sd = opt.state_dict()
    changed = {"g0": {"block_size": 64}, "g2": {"betas": (0.0, 0.9)}, "g3": {"eps": 1e-6, "weight_decay": 0.1}}
    for load in ("state_dict", "dcp"):
        model2, target = other(changed)
        target.param_groups[1]["precondition_frequency"] = 7
        if load == "state_dict":
            target.load_state_dict(sd)
        else:
            save_checkpoint(str(tmp_path / "c"), model, opt)
            load_checkpoint(str(tmp_path / "c"), model2, target)
        for g, h in zip(target.param_groups, opt.param_groups):
            assert all(g[k] == h[k] for k in g if k != "params")
        assert target.param_groups[0]["block_size"] == 1024 and target.param_groups[1]["precondition_frequency"] == 3
        assert target.global_step == 3


def test_a_pending_root_saved_on_another_device_is_installed_where_its_parameter_is_now():
    """A checkpoint taken on GPUs and resumed on other devices: the pending roots follow the
    parameters. ``meta`` stands for a device this process does not have."""
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    for item in sd["scalable_shampoo"]["scheduler"]["pending"]:
        for o in item["outcomes"]:
            o["device"] = "meta"
    resumed = build()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(sd)
    for step in range(5, 9):  # the pending roots are installed at step 7
        for m, o in ((model, opt), (resumed, resumed_opt)):
            set_grads(m, step)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert all(v.device.type == "cpu" for v in state_of(resumed_opt, resumed).values())


def test_torchrun_restarts_after_sigkill_and_resumes_bitwise_from_sharded_state(tmp_path):
    """Rank 1 is SIGKILLed at step 8 with roots pending; torchrun restarts the group, which
    resumes from the sharded checkpoint of step 6 and ends as one uninterrupted process."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import sharded_torchrun_worker as w

    out = tmp_path / "final.pt"
    killed_and_restarted("sharded_torchrun_worker.py", tmp_path, out)
    got = torch.load(out, weights_only=True)
    assert got["start"] == 6 and all(n > 0 for n in got["pending_loaded"])  # each rank resumed its own pending roots
    for step in (3, 6, 9, 12):
        check_writers(str(tmp_path / f"step{step}"), got["layout"])
    ref = w.build()
    ref_opt = w.make(ref, background=False, process_group=None)  # deterministic = InlineRoots(delay), bitwise
    for step in range(w.STEPS):
        w.grads(ref, step)
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(got["params"], ref.parameters()))


def test_a_checkpoint_without_optimizer_state_or_another_optimizer_is_refused(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = build()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp_path / "model-only"))
    opt = make(model)
    with pytest.raises(ValueError, match="holds no optimizer state: it was not written by"):
        load_checkpoint(str(tmp_path / "model-only"), model, opt)
    with pytest.raises(ValueError, match="optimizer must be a scalable_shampoo.Shampoo, got AdamW"):
        save_checkpoint(str(tmp_path / "c"), model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "c").exists()
