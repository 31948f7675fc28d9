"""``compile_elementwise=True``: the torch.compile path of the elementwise work against the eager one."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from scalable_shampoo import Shampoo


def _run(compile_elementwise: bool, steps: int = 12, **kw: object) -> tuple[list[torch.Tensor], Shampoo]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = Shampoo(model.parameters(), lr=1e-2, block_size=8, precondition_frequency=3, start_preconditioning_step=2,
                  compile_elementwise=compile_elementwise, **kw)  # type: ignore[arg-type]  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))  # a new lr at every step
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        schedule.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize(
    "kw", [dict(), dict(grafting="adagrad", betas=(0.0, 1.0), weight_decay=0.0)], ids=["adamw", "adagrad"]
)
def test_compiled_elementwise_matches_eager_and_compiles_once(kw: dict[str, object]) -> None:
    torch._dynamo.reset()
    eager, opt_e = _run(False, **kw)
    before = torch._dynamo.utils.counters["frames"]["ok"]
    compiled, opt_c = _run(True, **kw)
    frames = torch._dynamo.utils.counters["frames"]["ok"] - before
    for a, b in zip(eager, compiled):  # the same math in another order; roots of tiny statistics amplify it
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    (e1, opt_e1), (c1, opt_c1) = _run(False, steps=1, **kw), _run(True, steps=1, **kw)  # roots start at step 2
    for a, b in zip(e1, c1):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(opt_e1.state.values(), opt_c1.state.values()):
        for k in ("exp_avg", "graft_acc"):
            if k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-9)
    assert 1 <= frames <= 2  # the graft graph and the update graph, each compiled once: no recompiles per lr
    assert any(k.startswith("root.") for s in opt_c.state.values() for k in s)
