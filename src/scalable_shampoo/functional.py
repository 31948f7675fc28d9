"""The elementwise stages of a step, as pure ``torch._foreach_*`` functions.

Each line of the math is one fused op over a list of tensors (one param group,
device and dtype); a function ending in ``_`` updates its first argument in place.
The eager step calls them as they are; ``Shampoo(compile_elementwise=True)`` hands
the same functions to ``torch.compile`` (:func:`compiled`; roots and contractions
stay outside), with step counts and the lr as 0-d tensors so that neither
recompiles (β, ε, λ and the grafting type are baked into a group's graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockPlan
from .grafting import GraftingType, bias_correction, graft_directions

__all__ = ["compiled", "first_moment_", "graft_stage_", "heavy_ball_", "weight_update_"]

Step = int | Tensor  # a parameter's step count: an int, or a 0-d int64 tensor in the compiled path
Number = float | Tensor


def first_moment_(ms: list[Tensor], gs: list[Tensor], beta1: float, steps: Sequence[Step]) -> list[Tensor]:
    """M ← β₁M + (1−β₁)G; returns Ĝ = M/(1−β₁ᵗ)."""
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    return list(torch._foreach_div(ms, [bias_correction(beta1, t) for t in steps]))  # type: ignore[misc]


def graft_stage_(
    kind: GraftingType, beta1: float, beta2: float, eps: float, gs: list[Tensor], ms: list[Tensor],
    accs: list[Tensor], steps: Sequence[Step], plans: list[BlockPlan],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """(Ĝ, D): the filtered gradient (``gs`` itself when β₁ = 0) and the grafting update."""
    xs = first_moment_(ms, gs, beta1, steps) if beta1 > 0 else gs
    return xs, graft_directions(kind, gs, xs, accs, steps=steps, beta2=beta2, eps=eps, plans=plans)


def heavy_ball_(
    bufs: list[Tensor | None], dirs: list[Tensor], mu: float, nesterov: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """B ← μB + P, where a missing B starts as P (as ``torch.optim.SGD``).

    Returns (B, the direction): B, or P + μB with Nesterov.
    """
    old = [(b, d) for b, d in zip(bufs, dirs) if b is not None]
    if old:
        torch._foreach_mul_([b for b, _ in old], mu)
        torch._foreach_add_([b for b, _ in old], [d for _, d in old])
    new = [d.clone() if b is None else b for b, d in zip(bufs, dirs)]
    return new, list(torch._foreach_add(dirs, new, alpha=mu)) if nesterov else new


def weight_update_(ps: list[Tensor], dirs: list[Tensor], lr: Number, decay: float) -> None:
    """W ← W(1 − lr·λ) − lr·P, where ``decay`` is the decoupled λ (0 with L2 or none)."""
    if decay:
        torch._foreach_mul_(ps, 1 - lr * decay)
    if isinstance(lr, Tensor):  # a Tensor can't be an ``alpha``
        torch._foreach_sub_(ps, torch._foreach_mul(dirs, lr))
    else:
        torch._foreach_add_(ps, dirs, alpha=-lr)


_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, made once per function (each param group gets its own graph)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]
