"""Host syncs per step: at most one (the finiteness check) on a step that computes no roots.

On a GPU a host sync is any op that makes the CPU wait for the device: reading a
value (``.item()``, ``bool(t)``, ``float(t)``; all dispatch ``aten._local_scalar_dense``),
ops whose output shape depends on the data (``nonzero``, ``masked_select``), and
device→host copies. On a CPU none of them waits, but the same ops still dispatch, so
a ``TorchDispatchMode`` that records them counts the syncs the step would make on a
GPU. Excluded are the tensors the optimizer keeps on the CPU on purpose, whatever
the device (``state[p]["step"]``, ``root_info.*``): reading them never waits.

With a CUDA device the same count is made by ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from scalable_shampoo import Shampoo

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}


def _cpu_side(opt: Shampoo) -> set[int]:  # looked up at each op: step 1 creates them
    return {id(v) for s in opt.state.values() for k, v in s.items() if k == "step" or k.startswith("root_info.")}


class SyncCounter(TorchDispatchMode):
    """Records every op that would wait for the device, unless on a CPU-side tensor of ``opt``."""

    def __init__(self, opt: Shampoo | None) -> None:
        super().__init__()
        self.opt = opt
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        cpu_side = _cpu_side(self.opt) if name in SYNC_OPS and self.opt is not None else set()
        if name in SYNC_OPS and not (torch.is_tensor(first) and id(first) in cpu_side):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4))


CONFIGS = {
    "batched_adam": dict(),
    "plain_adam": dict(batched=False),
    "batched_adagrad_momentum": dict(grafting="adagrad", betas=(0.0, 1.0), momentum=0.9, nesterov=True),
    "plain_rmsprop_l2": dict(batched=False, grafting="rmsprop", decoupled_weight_decay=False),
    "batched_normalized_bf16_roots": dict(grafting="normalized_adagrad", root_storage_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_step_without_roots_makes_one_host_sync(config: str) -> None:
    model = _model()
    opt = Shampoo(model.parameters(), lr=1e-2, block_size=16, precondition_frequency=5,
                  start_preconditioning_step=2, **CONFIGS[config])  # type: ignore[arg-type]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
    per_step: dict[int, list[str]] = {}
    for step in range(1, 13):  # roots at steps 2, 7, 12
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        with SyncCounter(opt) as counter:
            opt.step()
        per_step[step] = counter.syncs
    assert opt.global_step == 12
    has_roots = any(k.startswith("root.") for s in opt.state.values() for k in s)
    assert has_roots
    for step in (1, 3, 4, 5, 6, 8, 9, 10, 11):  # before roots, and between recomputations
        assert per_step[step] == ["_local_scalar_dense"], (step, per_step[step])
    for step in (2, 7, 12):  # root steps read residuals and λ_max: allowed, and seen
        assert len(per_step[step]) > 1


def test_the_counter_sees_a_sync() -> None:
    """The check can fail: an ``.item()`` on a device tensor is counted."""
    t = torch.ones(3)
    with SyncCounter(None) as counter:
        t.sum().item()
        bool(t.any())
        t.nonzero()
    assert counter.syncs == ["_local_scalar_dense", "_local_scalar_dense", "nonzero"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_debug_mode_counts_one_sync_per_step_without_roots() -> None:
    model = _model().cuda()
    opt = Shampoo(model.parameters(), lr=1e-2, block_size=16, precondition_frequency=100, start_preconditioning_step=2)
    x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 4, device="cuda")
    counts = []
    for _ in range(7):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert all(c <= 1 for i, c in enumerate(counts, 1) if i != 2), counts  # step 2 computes roots
