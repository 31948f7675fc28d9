"""Optional ``torch.compile`` of a step's elementwise work: ``Shampoo(compile_elementwise=True)``.

The eager path (``Shampoo._graft`` and ``Shampoo._apply_updates``) runs each line
of the math as one ``torch._foreach_*`` op over a list of tensors. Here the same
math is written as two functions that ``torch.compile`` turns into a few fused
loops (CPU) or kernels (CUDA). The roots (eigh, coupled Newton) and the
preconditioning contractions stay outside the graphs.

Everything that changes from step to step enters as a tensor, so that a graph is
compiled once and not at every step: the step counts (``state[p]["step"]``, 0-d
CPU tensors) and the lr (a 0-d CPU tensor made at each step, so a learning-rate
schedule does not recompile either). Hyperparameters that are constant within a
param group (β, ε, λ, the grafting type) are baked into each group's graph.

Results agree with the eager path to rounding (the bias corrections and the lr
step are computed in another order), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["compiled_graft", "compiled_update", "graft_math", "update_math"]


def graft_math(
    kind: str, beta1: float, beta2: float, eps: float, gs: list[Tensor], ms: list[Tensor], accs: list[Tensor],
    steps: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """(Ĝ, D): M ← β₁M + (1−β₁)G, Ĝ = M/(1−β₁ᵗ); v ← (β₂v +) (1−β₂)g²; D = Ĝ/(√(v/(1−β₂ᵗ)) + ε).

    ``kind`` is one of none, sgd, adagrad, rmsprop, adam (the normalized types run eagerly).
    """
    x = gs
    if beta1 > 0:
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        x = [m / (1 - beta1 ** t.double()) for m, t in zip(ms, steps)]
    if kind in ("none", "sgd"):
        return x, x
    if kind == "adagrad" or beta2 == 1:
        torch._foreach_addcmul_(accs, gs, gs)
    else:
        torch._foreach_mul_(accs, beta2)
        torch._foreach_addcmul_(accs, gs, gs, value=1 - beta2)
    denom = list(torch._foreach_sqrt(accs))
    if kind == "adam" and beta2 < 1:
        denom = [d / (1 - beta2 ** t.double()).sqrt() for d, t in zip(denom, steps)]
    torch._foreach_add_(denom, eps)
    return x, list(torch._foreach_div(x, denom))


def update_math(ps: list[Tensor], dirs: list[Tensor], lr: Tensor, decay: float) -> None:
    """W ← W(1 − lr·λ) − lr·P (``decay`` = λ, decoupled; 0 for none or L2)."""
    if decay:
        torch._foreach_mul_(ps, 1 - lr * decay)
    torch._foreach_sub_(ps, torch._foreach_mul(dirs, lr))


_compiled: dict[str, Any] = {}


def _compile(name: str, fn: Any) -> Any:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def compiled_graft(*args: Any) -> tuple[list[Tensor], list[Tensor]]:
    result: tuple[list[Tensor], list[Tensor]] = _compile("graft", graft_math)(*args)
    return result


def compiled_update(*args: Any) -> None:
    _compile("update", update_math)(*args)
