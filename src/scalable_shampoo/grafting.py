"""Grafting: a first-order method supplies each block's step size (Agarwal et al. 2020).

Shampoo's direction P is rescaled per block to the norm of the update ``D``
that the grafting method would make: ``P ← P·‖D‖/‖P‖`` (:func:`grafted_direction`).
Every method here is elementwise; its accumulator has the parameter's shape.

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

from collections.abc import Mapping, Sequence
from enum import Enum

import torch
from torch import Tensor

from .blocks import BlockPlan, block_views
from .kronecker import stacked_precondition

__all__ = ["GraftingType", "bias_correction", "graft_directions", "grafted_direction", "rescale_"]


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


def bias_correction(beta: float, t: int | Tensor) -> float | Tensor:
    """1 − βᵗ (in float64 for a tensor step, as for an int one)."""
    return 1 - beta ** (t.double() if isinstance(t, Tensor) else t)


def _normalize_blocks(t: Tensor, plan: BlockPlan) -> Tensor:
    """A copy of ``t`` with every block scaled to unit Frobenius norm (zero stays zero)."""
    out = t.clone()
    views = block_views(out, plan)
    norms = torch._foreach_norm(views)
    torch._foreach_div_(views, [n.clamp_min(torch.finfo(t.dtype).tiny) for n in norms])
    return out


def graft_directions(
    kind: GraftingType,
    gs: list[Tensor],
    xs: list[Tensor],
    accumulators: list[Tensor],
    *,
    steps: Sequence[int | Tensor],
    beta2: float,
    eps: float,
    plans: list[BlockPlan],
) -> list[Tensor]:
    """Update the ``accumulators`` in place from ``gs``; return the grafting directions for ``xs``.

    One fused ``torch._foreach_*`` op per line of the table above, over all the
    parameters of one param group (same device and dtype). ``gs`` are this step's
    gradients, ``xs`` the (possibly momentum-filtered) gradients being
    preconditioned; both are left unchanged. ``steps`` are the parameters' step counts
    (ints, or 0-d tensors in the compiled path).
    """
    if not kind.has_accumulator:
        return list(xs)
    if kind.normalized:
        gs = [_normalize_blocks(g, plan) for g, plan in zip(gs, plans)]
        xs = [_normalize_blocks(x, plan) for x, plan in zip(xs, plans)]
    if kind in (GraftingType.ADAGRAD, GraftingType.NORMALIZED_ADAGRAD) or beta2 == 1:
        torch._foreach_addcmul_(accumulators, gs, gs)  # v ← v + g² (β₂ = 1 means a sum for every method)
    else:  # v ← β₂v + (1−β₂)g²
        torch._foreach_mul_(accumulators, beta2)
        torch._foreach_addcmul_(accumulators, gs, gs, value=1 - beta2)
    denom = torch._foreach_sqrt(accumulators)
    if kind is GraftingType.ADAM and beta2 < 1:  # √(v/(1−β₂ᵗ))
        torch._foreach_div_(denom, [bias_correction(beta2, t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    return list(torch._foreach_div(xs, denom))


def grafted_direction(
    x: Tensor, d: Tensor, roots: Mapping[int, Tensor], rescale: bool, work: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """P ← Ĝ ×ₐ H_a^(-1/p);  P ← P·‖D‖/‖P‖, for every block of a stack ``[B, *block]``.

    ``x`` (Ĝ), ``d`` (D): stacks; ``roots``: ``[B, n, n]`` per axis; ``work``: as for
    :func:`stacked_precondition`. Without ``rescale`` (grafting ``none``) P keeps its own
    scale. With it, Ĝ is first divided by its max per block, in place (``x`` must not be
    ``d``): the same P after the rescale, and no power of a large Ĝ can overflow."""
    if not rescale:
        return stacked_precondition(x, roots, work)
    dims = tuple(range(1, x.dim()))
    tiny = torch.finfo(x.dtype).tiny
    x_max = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
    return rescale_(stacked_precondition(x.div_(x_max.clamp_min_(tiny)), roots, work), d)


def rescale_(pre: Tensor, d: Tensor) -> Tensor:
    """P ← P·‖D‖/‖P‖ in place, per block of a stack ``[B, *block]`` (a zero P stays zero)."""
    dims = tuple(range(1, pre.dim()))
    d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    tiny = torch.finfo(pre.dtype).tiny
    return pre.mul_(d_norm.div_(torch.linalg.vector_norm(pre, dim=dims, keepdim=True).clamp_min_(tiny)))
