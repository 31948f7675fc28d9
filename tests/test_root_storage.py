"""Roots stored in bf16 (``root_storage_dtype``): memory, accuracy, paths and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import train
from torch import nn

from scalable_shampoo import Shampoo


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 8))


def _train(model: nn.Module, opt: Shampoo, steps: int, first: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Steps ``first`` … ``first + steps - 1`` on one fixed batch, the loss scaled by ``1 + t/10`` at step ``t``."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 24, generator=gen).to(dtype), torch.randn(64, 8, generator=gen).to(dtype)
    train(model, opt, range(first, first + steps), lambda m, t: (m(x) - y).pow(2).mean() * (1 + 0.1 * t))


def _opt(model: nn.Module, **kw: object) -> Shampoo:
    return Shampoo(model.parameters(), lr=1e-2, block_size=32, precondition_frequency=3,
                   start_preconditioning_step=2, **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("batched", [True, False])
def test_bf16_roots_halve_root_memory_and_keep_statistics_fp32(batched: bool) -> None:
    full, half = _model(), _model()
    opt_full, opt_half = _opt(full, batched=batched), _opt(half, batched=batched, root_storage_dtype=torch.bfloat16)
    _train(full, opt_full, 6)
    _train(half, opt_half, 6)
    m_full, m_half = opt_full.memory(), opt_half.memory()
    assert m_full["roots"] > 0 and m_half["roots"] * 2 == m_full["roots"]
    assert m_half["statistics"] == m_full["statistics"]
    roots = [v for s in opt_half.state.values() for k, v in s.items() if k.startswith("root.")]
    stats = [v for s in opt_half.state.values() for k, v in s.items() if k.startswith("stat.")]
    assert roots and all(r.dtype == torch.bfloat16 for r in roots)
    assert all(s.dtype == torch.float32 for s in stats)


def test_bf16_roots_change_the_update_by_bf16_rounding_only() -> None:
    full, half = _model(), _model()
    opt_full, opt_half = _opt(full), _opt(half, root_storage_dtype=torch.bfloat16)
    _train(full, opt_full, 3)  # roots installed at step 2, used at step 2 and 3
    _train(half, opt_half, 3)
    moved_full = [(p - q).detach() for p, q in zip(full.parameters(), _model().parameters())]
    moved_half = [(p - q).detach() for p, q in zip(half.parameters(), _model().parameters())]
    for a, b in zip(moved_full, moved_half):
        rel = float((a - b).norm() / a.norm().detach())
        assert 0 < rel < 2e-2  # bf16 keeps 8 bits: a relative error of order 2⁻⁸ per root
    for s_full, s_half in zip(opt_full.state.values(), opt_half.state.values()):
        for k, v in s_full.items():
            if k.startswith("root."):
                assert torch.allclose(s_half[k].float(), v, rtol=1e-2, atol=1e-2 * float(v.abs().max()))


def test_bf16_roots_batched_matches_plain() -> None:
    """fp64, as test_batched.py: the two paths agree to rounding, and so do their bf16 roots."""
    a, b = _model().double(), _model().double()
    opt_a = _opt(a, batched=True, root_storage_dtype=torch.bfloat16, root_dtype=torch.float64)
    opt_b = _opt(b, batched=False, root_storage_dtype=torch.bfloat16, root_dtype=torch.float64)
    _train(a, opt_a, 8, dtype=torch.float64)
    _train(b, opt_b, 8, dtype=torch.float64)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        for k, v in sa.items():
            if k.startswith("root."):
                assert v.dtype == sb[k].dtype == torch.bfloat16 and torch.equal(v, sb[k])


def test_bf16_roots_survive_a_checkpoint_and_resume_bitwise() -> None:
    ref = _model()
    opt_ref = _opt(ref, root_storage_dtype=torch.bfloat16)
    _train(ref, opt_ref, 10)

    first = _model()
    opt_first = _opt(first, root_storage_dtype=torch.bfloat16)
    _train(first, opt_first, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt_resumed = _opt(resumed, root_storage_dtype=torch.bfloat16)
    opt_resumed.load_state_dict(saved["opt"])
    roots = [v for s in opt_resumed.state.values() for k, v in s.items() if k.startswith("root.")]
    assert roots and all(r.dtype == torch.bfloat16 for r in roots)
    _train(resumed, opt_resumed, 5, first=5)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [torch.int8, "bfloat16", torch.complex64])
def test_bad_root_storage_dtype_names_the_argument(bad: object) -> None:
    with pytest.raises(ValueError, match=r"root_storage_dtype must be None or a floating-point torch\.dtype"):
        Shampoo(_model().parameters(), root_storage_dtype=bad)  # type: ignore[arg-type]
