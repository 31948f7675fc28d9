"""How a parameter is cut into preconditioned blocks (pure; the plan is cached per shape).

1. Merge adjacent small dims while their product stays ≤ ``merge_bound``
   (size-1 dims vanish): ``[3,3,128,128] → [9,128,128]`` under 1024. A matrix
   is never merged into a vector.
2. An axis longer than ``max_preconditioner_dim`` keeps no statistic; the
   tensor is preconditioned on its other axes only (one-sided), which is how
   an embedding table (vocab × d) is handled. Such an axis is not split.
3. Every other axis is split into ``block_size`` pieces, the last one possibly
   smaller. Each block keeps one statistic per axis that is preconditioned in it
   (an axis of length 1 within a block is not).
4. A 1-d tensor is preconditioned only with ``precondition_1d``; a tensor with no
   preconditioned axis left gets the grafting update alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

__all__ = ["Block", "BlockPlan", "make_plan", "merge_small_dims", "block_views"]


def merge_small_dims(shape: tuple[int, ...], bound: int) -> tuple[int, ...]:
    """Greedily merge adjacent dims while the product stays ≤ ``bound``; drop 1s.

    A tensor with two or more dims above 1 is never merged into a vector (that
    would lose its Kronecker structure): it keeps its dims, 1s dropped.
    """
    merged: list[int] = []
    product = 1
    for d in shape:
        if product * d <= bound:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    squeezed = tuple(d for d in shape if d != 1)
    if len(merged) < 2 <= len(squeezed):
        return squeezed
    return tuple(merged)


@dataclass(frozen=True)
class Block:
    """One block: its slice of the merged tensor and its preconditioned axes."""

    index: tuple[slice, ...]
    shape: tuple[int, ...]
    axes: tuple[int, ...]  # axes that keep a statistic in this block

    def exponent(self, override: int | None) -> int:
        """p in L^(-1/p): 2k over the k preconditioned axes, unless overridden."""
        return override if override is not None else 2 * len(self.axes)


@dataclass(frozen=True)
class BlockPlan:
    shape: tuple[int, ...]  # the parameter's own shape
    merged: tuple[int, ...]
    blocks: tuple[Block, ...]

    @property
    def preconditioned(self) -> bool:
        return any(b.axes for b in self.blocks)


@lru_cache(maxsize=1024)
def make_plan(
    shape: tuple[int, ...],
    block_size: int,
    max_preconditioner_dim: int,
    merge_bound: int,
    precondition_1d: bool,
) -> BlockPlan:
    merged = merge_small_dims(shape, merge_bound)
    if 0 in shape:
        return BlockPlan(shape, (0,), ())
    allowed = [d <= max_preconditioner_dim for d in merged]
    if len(merged) == 1 and not precondition_1d:
        allowed = [False]
    chunks = []
    for d, ok in zip(merged, allowed):
        starts = range(0, d, block_size) if ok else range(0, d, d)
        chunks.append([slice(s, min(s + block_size, d) if ok else d) for s in starts])
    blocks = []
    for index in itertools.product(*chunks):
        bshape = tuple(s.stop - s.start for s in index)
        axes = tuple(i for i, (n, ok) in enumerate(zip(bshape, allowed)) if ok and n > 1)
        blocks.append(Block(tuple(index), bshape, axes))
    return BlockPlan(tuple(shape), merged, tuple(blocks))


def block_views(t: Tensor, plan: BlockPlan) -> list[Tensor]:
    """Views of each block of a contiguous tensor shaped like the parameter.

    Writing into a view writes into ``t``, so merging blocks back is a write
    into these views of the output.
    """
    merged = t.view(plan.merged) if plan.blocks else t
    return [merged[b.index] for b in plan.blocks]

