"""Eigenvalue-corrected Shampoo: the per-block step in the statistics' eigenbasis (pure).

George et al. 2018 (EKFAC), SOAP (Vyas et al. 2024) and Eschenhagen et al. 2025: keep
only the eigenvectors ``Q_i`` of each axis's statistic ``H_i`` (refreshed rarely, by the
root schedulers), and run Adam's diagonal second moment in the rotated basis, every
step, so the scale stays fresh while the basis ages. For a stack ``[B, *block]``::

    G̃ = G ×ᵢ Q_iᵀ                         into the basis (Q_Lᵀ·G·Q_R for a matrix)
    V ← β₂V + w·G̃²                         w = 1 − β₂ (1 and a sum when β₂ = 1)
    M̃ = Ĝ ×ᵢ Q_iᵀ                         the first moment, kept in the original basis
    P = (M̃ / (V^(1/p)/b + ε)) ×ᵢ Q_i        b = (1 − β₂ᵗ)^(1/p), or 1 when β₂ = 1

p = 2 (Adam's square root, as SOAP) unless ``exponent_override`` sets it. Axes
without a statistic are not rotated (the block is Adam along them); with no basis at
all this is exactly Adam. The optimizer keeps V per parameter (``exp_avg_sq``): each
block's entries are in that block's current basis. The stack ``v`` handed in is a
gathered copy, updated in place; the state is written back by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .kronecker import stacked_rotate, statistic_weight
from .matrix_roots import root_power

__all__ = ["corrected_direction"]


def corrected_direction(
    g: Tensor,
    x: Tensor,
    v: Tensor,
    bases: Mapping[int, Tensor],
    beta2: float,
    bias: Tensor,
    eps: Tensor,
    p: int,
    work: tuple[Tensor, Tensor] | None = None,
    m: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """P for every block of a stack, and V ← β₂V + w·G̃² in place on ``v``.

    ``g``: this step's gradients G; ``x``: the filtered gradients Ĝ (``g`` itself when
    β₁ = 0); ``v``: the second moments in the basis; ``bases``: ``[B, n, n]`` per rotated
    axis; ``bias``, ``eps``: per block, broadcastable to ``[B, 1, …]`` (b and ε above);
    ``work``: two scratch stacks for the last contraction (see ``stacked_precondition``).
    ``m``: ``first_moment_basis="rotated"``: (M̃, 1 − β₁, 1 − β₁ᵗ), the last two per block;
    M̃ ← β₁M̃ + (1−β₁)G̃ in place, and M̃/(1 − β₁ᵗ) is used instead of ``x`` rotated.
    """
    gt = stacked_rotate(g, bases)
    w = statistic_weight(beta2)
    v.mul_(beta2).addcmul_(gt, gt, value=w)
    if m is not None:
        mt = m[0].lerp_(gt, m[1]).div(m[2])
    else:
        mt = gt if x is g else stacked_rotate(x, bases)
    denom = v.sqrt() if p == 2 else root_power(v, p, 1)
    denom.div_(bias).add_(eps)
    return stacked_rotate(mt.div_(denom), bases, back=True, work=work)  # mt is a new tensor (≥ 1 axis rotated)
