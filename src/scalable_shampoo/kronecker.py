"""Kronecker-factored statistics and preconditioning of one block (pure).

For a block G of order k, axis i keeps ``H_i = G₍ᵢ₎·G₍ᵢ₎ᵀ`` where ``G₍ᵢ₎`` is the
mode-i unfolding; a matrix G has ``H_0 = G·Gᵀ`` (L) and ``H_1 = Gᵀ·G`` (R).
Preconditioning contracts G with ``H_i^(-1/p)`` along every preconditioned axis:
``L^(-1/p)·G·R^(-1/p)`` for a matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["axis_statistic", "precondition"]


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
