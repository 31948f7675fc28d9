"""Copies and pickles are the same optimizer: ``copy.deepcopy``, ``pickle`` and
``torch.save(opt)``/``torch.load`` give an optimizer whose next steps are bit-identical
to the original's (inline and deterministic background roots), with its own workers,
the library's state-dict hooks and its diagnostics."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

from scalable_shampoo import BackgroundRoots, InlineRoots, Shampoo
from scalable_shampoo.background import RootJob, RootOutcome
from scalable_shampoo.state import TOP_KEY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


SETTINGS = dict(lr=1e-2, block_size=4, start_preconditioning_step=1, precondition_frequency=2, momentum=0.5)


def make(**kw: Any) -> Shampoo:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 6), (5,), (3, 5), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return Shampoo([{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}], **{**SETTINGS, **kw})


def params_of(opt: Shampoo) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def train(opt: Shampoo, first: int, last: int) -> None:
    """Steps ``first`` … ``last`` on a fixed batch per step, through the optimizer's own parameters."""
    for step in range(first, last + 1):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        w1, b1, w2, b2 = params_of(opt)
        opt.zero_grad()
        (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).pow(2).mean().backward()
        opt.step()


def assert_same(a: Shampoo, b: Shampoo) -> None:
    for p, q in zip(params_of(a), params_of(b)):
        assert torch.equal(p, q)
    for p, q in zip(params_of(a), params_of(b)):
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k
    assert (a.global_step, a.skipped_steps) == (b.global_step, b.skipped_steps)
    assert a.diagnostics() == b.diagnostics()


def via_torch_save(opt: Shampoo) -> Shampoo:
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded: Shampoo = torch.load(buf, weights_only=False)
    return loaded


COPIES: dict[str, Callable[[Shampoo], Shampoo]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
    "torch.save": via_torch_save,
}
SCHEDULERS: dict[str, Callable[[], Any]] = {
    "inline": lambda: None,
    "inline-delay2": lambda: InlineRoots(delay=2),
    "deterministic-thread": lambda: BackgroundRoots(mode="deterministic", delay=2),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("how", list(COPIES))
def test_copy_steps_bit_identical_to_the_original(how: str, scheduler: str) -> None:
    opt = make(scheduler=SCHEDULERS[scheduler]())
    train(opt, 1, 5)  # roots at steps 1, 3, 5; with delay 2 the result of step 5 is still pending
    dup = COPIES[how](opt)
    try:
        assert dup is not opt and all(p is not q for p, q in zip(params_of(opt), params_of(dup)))
        assert_same(opt, dup)
        for step in range(6, 26):  # the next 20 steps, compared after each
            train(opt, step, step)
            train(dup, step, step)
            assert_same(opt, dup)
        assert all(r["has_root"] and r["root_step"] >= 21 for r in dup.diagnostics()["blocks"])
    finally:
        opt.close()
        dup.close()


def test_plain_per_block_loop_copy_is_bit_identical() -> None:
    opt = make(batched=False, nonfinite_grad="raise")
    train(opt, 1, 4)
    dup = copy.deepcopy(opt)
    assert dup.batched is False and dup.nonfinite_grad == opt.nonfinite_grad
    train(opt, 5, 12)
    train(dup, 5, 12)
    assert_same(opt, dup)


@pytest.mark.parametrize("how", list(COPIES))
def test_copy_has_every_public_attribute_and_the_library_hooks(how: str) -> None:
    opt = make(nonfinite_grad="raise", scheduler=InlineRoots(delay=1))
    train(opt, 1, 3)
    opt.skipped_steps = 2  # as after two skipped steps
    dup = COPIES[how](opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(dup) if not k.startswith("_")}
    assert {"global_step", "skipped_steps", "scheduler", "nonfinite_grad", "batched", "compile_elementwise"} <= public
    for k in public - {"state", "param_groups", "scheduler"}:
        assert getattr(dup, k) == getattr(opt, k), k
    assert type(dup.scheduler) is InlineRoots and dup.scheduler.delay == 1 and dup.scheduler is not opt.scheduler
    # the library's hooks: the state dict carries the format and the counters, and a load is checked
    meta = dup.state_dict()[TOP_KEY]
    assert (meta["global_step"], meta["skipped_steps"]) == (3, 2)
    with pytest.raises(ValueError, match="not saved by scalable_shampoo.Shampoo"):
        dup.load_state_dict(torch.optim.SGD(params_of(dup)).state_dict())
    # and a bf16 parameter's fp32 statistics survive a load into the copy (torch would cast them)
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    w.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    bf = Shampoo([w], start_preconditioning_step=1)
    bf.step()
    bf_copy = COPIES[how](bf)
    bf_copy.load_state_dict(bf.state_dict())
    assert bf_copy.state[params_of(bf_copy)[0]]["stat.0.0"].dtype == torch.float32


def test_user_hooks_are_not_copied_as_in_torch_optim() -> None:
    opt = make()
    calls: list[str] = []
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    dup = copy.deepcopy(opt)
    train(dup, 1, 1)
    assert calls == []  # torch.optim's __getstate__ drops every hook; the library re-registers its own
    train(opt, 1, 1)
    assert calls == ["post"]


def test_latency_copy_starts_its_own_worker_and_keeps_installing_roots() -> None:
    opt = make(scheduler=BackgroundRoots(mode="latency", max_staleness=3))
    train(opt, 1, 4)
    dup = pickle.loads(pickle.dumps(opt))
    try:
        ours, theirs = opt.scheduler, dup.scheduler
        assert isinstance(theirs, BackgroundRoots) and theirs.mode == "latency" and theirs.max_staleness == 3
        assert theirs._threads and all(t.is_alive() for t in theirs._threads)
        assert not {id(t) for t in theirs._threads} & {id(t) for t in ours._threads}
        opt.close()  # the original's workers stop; the copy's keep going
        train(dup, 5, 14)
        rows = dup.diagnostics()["blocks"]
        assert all(r["has_root"] and r["root_step"] >= 14 - 3 for r in rows)  # within the staleness bound
        assert all(torch.isfinite(p).all() for p in params_of(dup))
    finally:
        opt.close()
        dup.close()


def test_process_worker_copy_starts_its_own_process_and_is_bit_identical() -> None:
    opt = make(scheduler=BackgroundRoots(mode="deterministic", delay=1, workers="process"))
    train(opt, 1, 3)
    dup = copy.deepcopy(opt)
    try:
        mine, theirs = opt.scheduler._runners[0].process, dup.scheduler._runners[0].process
        assert theirs.is_alive() and theirs.pid != mine.pid
        train(opt, 4, 9)
        train(dup, 4, 9)
        assert_same(opt, dup)
    finally:
        opt.close()
        dup.close()


def test_a_closed_background_scheduler_says_why_it_cannot_be_copied() -> None:
    opt = make(scheduler=BackgroundRoots(mode="latency"))
    train(opt, 1, 2)
    opt.close()
    for how in COPIES.values():
        with pytest.raises(RuntimeError, match=r"was closed \(close\(\) stopped its workers\)"):
            how(opt)


def failing(jobs: list[RootJob]) -> list[RootOutcome]:
    raise ArithmeticError("injected failure")


def test_a_failed_pending_job_says_why_it_cannot_be_copied() -> None:
    opt = make(scheduler=BackgroundRoots(mode="deterministic", delay=5, compute_fn=failing))
    try:
        train(opt, 1, 1)
        with pytest.raises(RuntimeError, match="cannot be copied or pickled: .*ArithmeticError: injected failure"):
            copy.deepcopy(opt)
    finally:
        opt.close()


def test_an_optimizer_pickled_before_copies_carried_everything_still_steps() -> None:
    # what unpickling an optimizer pickled by an earlier version gives: torch's three entries only
    opt = make()
    train(opt, 1, 5)
    old = Shampoo.__new__(Shampoo)
    old.__setstate__(copy.deepcopy(torch.optim.Optimizer.__getstate__(opt)))
    assert old.global_step == 5 and old.skipped_steps == 0 and isinstance(old.scheduler, InlineRoots)
    train(opt, 6, 12)
    train(old, 6, 12)
    assert_same(opt, old)


def test_a_copy_of_a_sharded_optimizer_needs_torch_distributed() -> None:
    from scalable_shampoo.distributed import Sharding

    assert not torch.distributed.is_initialized()
    sharding = Sharding.__new__(Sharding)
    sharding.group, sharding.communication_dtype = None, None
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        copy.deepcopy(sharding)
