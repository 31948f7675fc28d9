"""Kronecker-factored statistics and preconditioning of one block (pure).

For a block G of order k, axis i keeps ``H_i = G₍ᵢ₎·G₍ᵢ₎ᵀ`` where ``G₍ᵢ₎`` is the
mode-i unfolding; a matrix G has ``H_0 = G·Gᵀ`` (L) and ``H_1 = Gᵀ·G`` (R).
Preconditioning contracts G with ``H_i^(-1/p)`` along every preconditioned axis:
``L^(-1/p)·G·R^(-1/p)`` for a matrix.

The optimizer works on stacks ``[B, *block]`` of equal blocks with ``[B, n, n]``
stacks of statistics and roots (batched matmuls): :func:`accumulate_statistics_`
and :func:`stacked_precondition`. ``axis_statistic`` and ``precondition`` are the
same formulas for one block (a stack of one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "SPLIT_DIM",
    "accumulate_statistics_",
    "axis_statistic",
    "pack_root_",
    "packed_statistic",
    "precondition",
    "stacked_precondition",
    "stacked_rotate",
    "stacked_unfolding",
    "statistic_weight",
    "unpack_root",
]


def statistic_weight(beta2: float) -> float:
    """w in H ← β₂·H + w·G₍ᵢ₎G₍ᵢ₎ᵀ: 1 for a sum (β₂ = 1, AdaGrad style), else 1 − β₂ (an EMA)."""
    return 1.0 if beta2 == 1 else 1.0 - beta2


# A statistic at least this large is accumulated by quarters: H is symmetric, so the lower-left
# quarter and the two diagonal ones are computed (3/4 of the full product's multiply-adds) and
# the upper-right quarter is the lower-left one mirrored. Below this size the three smaller
# products were not faster than one on a CPU (measured at n = 256 and 512 against 1024).
SPLIT_DIM = 1024


def accumulate_statistics_(
    stats: Tensor, g: Tensor, axis: int, beta2: float, packed: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """H ← β₂·H + w·G₍ᵢ₎G₍ᵢ₎ᵀ in place, for a stack ``[B, n, n]`` and blocks ``[B, *block]``.

    For n ≥ :data:`SPLIT_DIM` by quarters (the upper-right one mirrored from the lower-left).
    ``packed``: ``(work, upper)``, a scratch stack shaped like ``stats`` and the ``[n, n]`` bool
    mask of the strict upper triangle, for packed storage (:func:`pack_root_`): only H's lower
    triangle (with the diagonal) is written, a diagonal block's update going through ``work``;
    the strict upper triangle (the root's) is left as it is."""
    u = stacked_unfolding(g, axis)
    n, w = stats.shape[-1], statistic_weight(beta2)
    h = n // 2 if n >= SPLIT_DIM else 0
    if h:  # the lower-left quarter: all statistic, in either layout
        stats[:, h:, :h].baddbmm_(u[:, h:], u[:, :h].mT, beta=beta2, alpha=w)
    for d in (slice(0, h), slice(h, n)) if h else (slice(0, n),):  # the diagonal blocks
        block, ud = stats[:, d, d], u[:, d]
        if packed is None:
            block.baddbmm_(ud, ud.mT, beta=beta2, alpha=w)
        else:
            m = block.shape[-1]
            new = torch.baddbmm(block, ud, ud.mT, beta=beta2, alpha=w, out=packed[0][:, :m, :m])
            torch.where(packed[1][d, d], block, new, out=block)
    if h and packed is None:
        stats[:, :h, h:].copy_(stats[:, h:, :h].mT)
    return stats


# Packed storage (``Shampoo(packed_storage=True)``): a statistic H and its inverse root R are
# symmetric, so one n×n matrix holds H's lower triangle (with the diagonal) and R's strict upper
# triangle, and R's diagonal is kept apart (n numbers): n² + n numbers instead of 2n².


def pack_root_(packed: Tensor, root: Tensor) -> Tensor:
    """Write ``root``'s strict upper triangle into ``packed`` (its lower triangle, H's, is kept);
    returns ``root``'s diagonal (a copy). Stacks ``[B, n, n]`` or one matrix."""
    packed.tril_().add_(root.triu(1))
    return root.diagonal(dim1=-2, dim2=-1).clone()


def unpack_root(packed: Tensor, diag: Tensor, upper: Tensor, out: Tensor) -> Tensor:
    """The full root R of ``packed`` and its diagonal ``diag``, into ``out``; ``upper`` is the
    ``[n, n]`` bool mask of the strict upper triangle."""
    torch.where(upper, packed, packed.mT, out=out)
    out.diagonal(dim1=-2, dim2=-1).copy_(diag)
    return out


def packed_statistic(packed: Tensor) -> Tensor:
    """The full statistic H of ``packed`` (a new tensor): its lower triangle, mirrored."""
    return packed.tril() + packed.tril(-1).mT


def axis_statistic(g: Tensor, axis: int) -> Tensor:
    """``G₍ᵢ₎·G₍ᵢ₎ᵀ`` of one block: every axis but ``axis`` of G contracted with itself."""
    u = stacked_unfolding(g.unsqueeze(0), axis)
    return (u @ u.mT)[0]


def precondition(g: Tensor, roots: Mapping[int, Tensor]) -> Tensor:
    """One block G contracted with the symmetric matrix ``roots[i]`` along each axis i in ``roots``."""
    return stacked_precondition(g.unsqueeze(0), {a: r.unsqueeze(0) for a, r in roots.items()})[0]


def stacked_unfolding(g: Tensor, axis: int) -> Tensor:
    """``G₍ᵢ₎`` of every block of a stack ``[B, *block]``, as ``[B, n_i, rest]``.

    ``U @ Uᵀ`` (``torch.baddbmm``) is then ``axis_statistic`` of every block.
    """
    if g.dim() == 3 and axis == 1:
        return g.mT  # a view: Gᵀ of each block
    return g.movedim(axis + 1, 1).reshape(g.shape[0], g.shape[axis + 1], -1)


def stacked_precondition(
    g: Tensor, roots: Mapping[int, Tensor], work: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``precondition`` of every block of a stack ``[B, *block]`` by root stacks ``[B, n, n]``.

    ``work``: two scratch stacks shaped like ``g`` that receive, for a two-sided matrix
    block, ``R₀·G`` and the result, instead of new tensors. The first must not be ``g``;
    the second may be (``g`` is read by the first product only).
    """
    if g.dim() == 3 and len(roots) == 2:
        if work is None:
            return torch.bmm(torch.bmm(roots[0], g), roots[1])
        return torch.bmm(torch.bmm(roots[0], g, out=work[0]), roots[1], out=work[1])
    x = g
    for axis in range(g.dim() - 1):
        x = x.movedim(1, -1)  # the axis to contract goes last: [B, rest…, n]
        root = roots.get(axis)
        if root is not None:
            shape = x.shape
            x = torch.bmm(x.reshape(shape[0], -1, shape[-1]), root).view(shape)
    return x


def stacked_rotate(
    g: Tensor, bases: Mapping[int, Tensor], back: bool = False, work: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Every block of a stack into its eigenbasis, ``G ×ᵢ Q_iᵀ`` (``Q_Lᵀ·G·Q_R`` for a
    matrix), or with ``back`` out of it, ``G ×ᵢ Q_i`` (``Q_L·G·Q_Rᵀ``), by bases ``[B, n, n]``
    (eigenvectors in columns) per axis in ``bases``; the other axes are left as they are.

    The contraction is :func:`stacked_precondition`'s, which takes axis i of G against
    the first index of its matrix, except for a two-sided matrix block, where it computes
    ``R₀·G·R₁`` (axis 0 against R₀'s second index); roots are symmetric, bases are not,
    so the matrices handed to it are transposed (views) accordingly.
    """
    if g.dim() == 3 and len(bases) == 2:
        mats = {0: bases[0] if back else bases[0].mT, 1: bases[1].mT if back else bases[1]}
    else:
        mats = {a: q.mT if back else q for a, q in bases.items()}
    return stacked_precondition(g, mats, work)
