"""A Tensor lr, as torch.optim takes it: a 1-element Tensor steps bit for bit like the
float it holds, under the LR schedulers; a larger one is refused; the compiled
elementwise path takes a changing Tensor lr without recompiling."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler

from scalable_shampoo import Shampoo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


SETTINGS = dict(block_size=4, start_preconditioning_step=2, precondition_frequency=2, weight_decay=0.1)

SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any] | None] = {
    "none": None,
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t)),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.9),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=6),
}


def params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 6), (5,), (3, 5), (3,)]]


def run(
    lr: float | torch.Tensor, schedule: str, steps: int = 12, one_group: bool = False, **kw: Any
) -> tuple[list[torch.Tensor], Shampoo]:
    ps = params()
    groups = [{"params": ps}] if one_group else [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]
    opt = Shampoo(groups, lr=lr, **{**SETTINGS, **kw})
    make = SCHEDULES[schedule]
    sched = make(opt) if make is not None else None
    for step in range(1, steps + 1):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        w1, b1, w2, b2 = ps
        opt.zero_grad()
        (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in ps], opt


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-elem", "1x1"])
def test_tensor_lr_steps_bit_for_bit_like_the_float_lr(shape: tuple[int, ...], schedule: str) -> None:
    lr = torch.full(shape, 2e-2, dtype=torch.float64)  # holds exactly the float 2e-2
    expected, opt_f = run(2e-2, schedule)
    got, opt_t = run(lr, schedule)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert any(k.startswith("root.") for s in opt_t.state.values() for k in s)  # the preconditioner was active
    for gf, gt in zip(opt_f.param_groups, opt_t.param_groups):  # the schedule wrote into the Tensor, in place
        assert isinstance(gt["lr"], torch.Tensor) and tuple(gt["lr"].shape) == shape and gt["lr"].item() == gf["lr"]


def test_float32_tensor_lr_steps_like_the_float_it_holds() -> None:
    lr = torch.tensor(1e-2)  # float32: it holds 0.009999999776482582, not 1e-2
    expected, _ = run(lr.item(), "none")
    got, _ = run(lr, "none")
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_tensor_lr_round_trips_through_a_checkpoint() -> None:
    _, opt = run(torch.tensor(2e-2, dtype=torch.float64), "none", steps=5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    ps = params()
    other = Shampoo([{"params": ps[:2]}, {"params": ps[2:]}], lr=torch.tensor(0.5, dtype=torch.float64), **SETTINGS)
    other.load_state_dict(sd)
    assert all(torch.is_tensor(g["lr"]) and g["lr"].item() == 2e-2 for g in other.param_groups)
    assert other.param_groups[0]["lr"] is not opt.param_groups[0]["lr"]


@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 3)])
def test_a_larger_tensor_lr_is_refused_before_the_params_are_read(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        Shampoo(None, lr=torch.full(shape, 1e-3))  # type: ignore[arg-type]
    opt = Shampoo(params()[:1])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": params()[1:], "lr": torch.full(shape, 1e-3)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("lr", [torch.tensor(-1e-3), torch.tensor([1], dtype=torch.int64)], ids=["negative", "int"])
def test_a_bad_tensor_lr_is_named(lr: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="lr must be a floating-point Tensor ≥ 0, got tensor"):
        Shampoo(params(), lr=lr)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_update_takes_a_changing_tensor_lr_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    lr = torch.tensor(2e-2, dtype=torch.float64)
    compiled = dict(compile_elementwise=True, one_group=True)
    run(lr.clone(), "LambdaLR", steps=2, **compiled)  # compiles the graft graph and the update graph
    frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    assert frames >= 1 and graphs >= 1
    got, opt = run(lr, "LambdaLR", steps=10, **compiled)  # a new lr at every step, written into the Tensor
    assert counters["frames"]["ok"] == frames and counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 2e-2 / 11
    expected, _ = run(2e-2, "LambdaLR", steps=10, **compiled)  # the float lr: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
