"""Grafting: a first-order method supplies each block's step size (Agarwal et al. 2020).

Shampoo's direction P is rescaled per block to the norm of the update ``D``
that the grafting method would make: ``P ← P·‖D‖/‖P‖``. Every method here
is elementwise; its accumulator has the parameter's shape.

=====================  ==========================================  ==============================
type                   accumulator v (from the gradient g)         direction D (from x = Ĝ)
=====================  ==========================================  ==============================
none                   —                                           x (Shampoo's own scale)
sgd                    —                                           x
adagrad                v ← v + g²                                  x / (√v + eps)
rmsprop                v ← β₂v + (1−β₂)g²                          x / (√v + eps)
adam                   v ← β₂v + (1−β₂)g²                          x / (√(v/(1−β₂ᵗ)) + eps)
normalized_adagrad     as adagrad, g and x scaled per block to unit norm first
normalized_rmsprop     as rmsprop, g and x scaled per block to unit norm first
=====================  ==========================================  ==============================

With β₂ = 1, RMSprop and Adam sum like AdaGrad (no bias correction), as the
statistics do.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .blocks import BlockPlan, block_views

__all__ = ["GraftingType", "graft_direction"]


class GraftingType(str, Enum):
    NONE = "none"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"
    ADAM = "adam"
    NORMALIZED_ADAGRAD = "normalized_adagrad"
    NORMALIZED_RMSPROP = "normalized_rmsprop"

    @property
    def has_accumulator(self) -> bool:
        return self not in (GraftingType.NONE, GraftingType.SGD)

    @property
    def normalized(self) -> bool:
        return self in (GraftingType.NORMALIZED_ADAGRAD, GraftingType.NORMALIZED_RMSPROP)


def _normalize_blocks(t: Tensor, plan: BlockPlan) -> Tensor:
    """A copy of ``t`` with every block scaled to unit Frobenius norm (zero stays zero)."""
    out = t.clone()
    views = block_views(out, plan)
    norms = torch._foreach_norm(views)
    torch._foreach_div_(views, [n.clamp_min(torch.finfo(t.dtype).tiny) for n in norms])
    return out


def graft_direction(
    kind: GraftingType,
    g: Tensor,
    x: Tensor,
    accumulator: Tensor | None,
    *,
    step: int,
    beta2: float,
    eps: float,
    plan: BlockPlan,
) -> Tensor:
    """Update ``accumulator`` in place from ``g`` and return the grafting direction for ``x``.

    ``g`` is this step's gradient, ``x`` the (possibly momentum-filtered)
    gradient that is being preconditioned; both are left unchanged.
    """
    if not kind.has_accumulator:
        return x
    assert accumulator is not None
    if kind.normalized:
        g, x = _normalize_blocks(g, plan), _normalize_blocks(x, plan)
    if kind in (GraftingType.ADAGRAD, GraftingType.NORMALIZED_ADAGRAD) or beta2 == 1:
        accumulator.addcmul_(g, g)  # a sum; β₂ = 1 means this for every method, as for the statistics
    else:
        accumulator.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = accumulator.sqrt()
    if kind is GraftingType.ADAM and beta2 < 1:
        denom.div_((1 - beta2**step) ** 0.5)
    return x / denom.add_(eps)
