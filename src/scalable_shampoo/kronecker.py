"""Kronecker-factored statistics and preconditioning of one block (pure).

For a block G of order k, axis i keeps ``H_i = G₍ᵢ₎·G₍ᵢ₎ᵀ`` where ``G₍ᵢ₎`` is the
mode-i unfolding; a matrix G has ``H_0 = G·Gᵀ`` (L) and ``H_1 = Gᵀ·G`` (R).
Preconditioning contracts G with ``H_i^(-1/p)`` along every preconditioned axis:
``L^(-1/p)·G·R^(-1/p)`` for a matrix.

The ``stacked_*`` functions do the same for a stack ``[B, *block]`` of equal
blocks with ``[B, n, n]`` stacks of statistics and roots (batched matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["axis_statistic", "precondition", "stacked_precondition", "stacked_unfolding"]


def axis_statistic(g: Tensor, axis: int) -> Tensor:
    """``G₍ᵢ₎·G₍ᵢ₎ᵀ``: contract every axis but ``axis`` of G with itself."""
    if g.dim() == 2:
        return g @ g.T if axis == 0 else g.T @ g
    others = [d for d in range(g.dim()) if d != axis]
    return torch.tensordot(g, g, dims=(others, others))


def precondition(g: Tensor, roots: Mapping[int, Tensor]) -> Tensor:
    """Contract G with the symmetric matrix ``roots[i]`` along each axis i in ``roots``.

    Each axis in turn is contracted (or, without a root, moved) to the end,
    so after all k axes the original order is back.
    """
    if g.dim() == 2 and len(roots) == 2:
        return roots[0] @ g @ roots[1]
    x = g
    for axis in range(g.dim()):
        root = roots.get(axis)
        x = torch.tensordot(x, root, dims=([0], [0])) if root is not None else x.movedim(0, -1)
    return x


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

    ``work``: two scratch stacks shaped like ``g`` (not ``g`` itself) that receive, for
    a two-sided matrix block, ``R₀·G`` and the result, instead of new tensors.
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
