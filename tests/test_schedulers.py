"""Learning-rate schedulers, including those that cycle momentum (β₁), against the
batched path's buckets and against torch.optim.AdamW."""

import pytest
import torch

from scalable_shampoo import Shampoo

NEVER = 10**9  # start_preconditioning_step that is never reached


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (2, 3, 4), (8, 8)]
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_() for s in shapes]


def train(opt, params, schedule, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        opt.step()
        if schedule is not None:
            schedule.step()


SCHEDULES = {
    "constant": lambda opt, steps: None,
    "step": lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "onecycle": lambda opt, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=steps),
    "cyclic": lambda opt, steps: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
}


@pytest.mark.parametrize("name", ["step", "onecycle", "cyclic"])
def test_a_schedule_rebuilds_the_buckets_no_more_often_than_a_constant_lr(name):
    steps = 20
    builds = {}
    for sched in ("constant", name):
        params = make_params(torch.float32)
        opt = Shampoo(params, lr=1e-2, precondition_frequency=4, start_preconditioning_step=2, block_size=4)
        train(opt, params, SCHEDULES[sched](opt, steps), steps)
        builds[sched] = opt._buckets.builds
    if name != "step":  # the schedule really did change β₁ each step
        assert opt.param_groups[0]["betas"][0] != 0.9
    assert builds["constant"] == 1
    assert builds[name] == builds["constant"], builds


@pytest.mark.parametrize("name", ["onecycle", "cyclic"])
@pytest.mark.parametrize("batched", [True, False])
def test_without_roots_shampoo_under_a_momentum_cycling_schedule_is_adamw(name, batched):
    steps = 20
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    ref_params = make_params()
    ref = torch.optim.AdamW(ref_params, **kw)
    ref_sched = SCHEDULES[name](ref, steps)
    params = make_params()
    opt = Shampoo(params, start_preconditioning_step=NEVER, grafting="adam", batched=batched, **kw)
    sched = SCHEDULES[name](opt, steps)
    betas_seen = set()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(params, ref_params):
            q.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        betas_seen.add(opt.param_groups[0]["betas"][0])
    assert len(betas_seen) >= 5  # β₁ really cycled
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
