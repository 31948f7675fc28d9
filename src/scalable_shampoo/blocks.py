"""How a parameter is cut into preconditioned blocks (pure; the plan is cached per shape).

1. Merge dims by fan-in grouping, the rule for PyTorch layouts: size-1 dims
   vanish; the leading dim stays its own axis; the dims after it are merged from
   the right while their product stays ≤ ``merge_bound``. A conv kernel
   ``[out, in, kh, kw]`` becomes ``[out, in·kh·kw]`` (``[in, out/groups·k…]`` for
   a ConvTranspose, ``[C, kh·kw]`` for a depthwise kernel), the layout of its
   im2col matrix; a Linear ``[out, in]`` is unchanged. With ``axes`` (the param
   group's ``precondition_axes``) a listed dim is never merged with an unlisted one.
2. An axis longer than ``max_preconditioner_dim``, or made of dims that are not in
   ``axes``, keeps no statistic; the tensor is preconditioned on its other axes only
   (one-sided), which is how an embedding table (vocab × d) is handled. Such an
   axis is not split.
3. Every other axis is split into ``block_size`` pieces, the last one possibly
   smaller. Each block keeps one statistic per axis that is preconditioned in it
   (an axis of length 1 within a block is not).
4. A 1-d tensor is preconditioned only with ``precondition_1d``; a tensor with no
   preconditioned axis left gets the grafting update alone.

Checkpoints of format 1 were made under the previous rule (``rule="left"``: all dims
merged greedily from the left, a matrix never merged into a vector), which suits
a ``[kh, kw, in, out]`` layout but groups a PyTorch kernel's output channels with
its input channels. It is kept here only so that a format-1 checkpoint can be checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from torch import Tensor

__all__ = [
    "Block", "BlockPlan", "block_views", "make_plan", "merge_groups", "merge_small_dims", "normalize_axes", "row_units",
    "rows_plan",
]  # fmt: skip

Rule = Literal["fan_in", "left"]


def normalize_axes(axes: tuple[int, ...] | None, ndim: int) -> tuple[int, ...] | None:
    """``axes`` as sorted non-negative dims of an ``ndim``-d tensor (negative ones count
    from the end); ``None`` stays ``None``. Raises ``IndexError`` for a dim out of range."""
    if axes is None:
        return None
    out = set()
    for a in axes:
        if not -ndim <= a < ndim:
            raise IndexError(a)
        out.add(a % ndim)
    return tuple(sorted(out))


def _left_groups(shape: tuple[int, ...], bound: int) -> tuple[tuple[int, ...], ...]:
    """Format 1's rule: greedy from the left over all dims; never a matrix into a vector."""
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    product = 1
    for i, d in enumerate(shape):
        if product * d <= bound:
            product *= d
            current.append(i)
        else:
            if product > 1:
                groups.append(tuple(current))
            product, current = d, [i]
    if product > 1:
        groups.append(tuple(current))
    squeezed = tuple((i,) for i, d in enumerate(shape) if d != 1)
    if len(groups) < 2 <= len(squeezed):
        return squeezed
    return tuple(tuple(i for i in g if shape[i] != 1) for g in groups)


def merge_groups(
    shape: tuple[int, ...], bound: int, axes: tuple[int, ...] | None = None, rule: Rule = "fan_in"
) -> tuple[tuple[int, ...], ...]:
    """The dims of ``shape`` (size-1 dims left out) that make up each merged axis.

    ``rule="fan_in"`` (see the module docstring): ``(32, 16, 3, 3)`` under 1024 →
    ``((0,), (1, 2, 3))``. ``axes``: dims that keep statistics; a dim in ``axes`` is
    never merged with one that is not. ``rule="left"`` is format 1's rule (``axes`` unused).
    """
    if rule == "left":
        return _left_groups(shape, bound)
    dims = [i for i, d in enumerate(shape) if d != 1]
    if len(dims) <= 2:
        return tuple((i,) for i in dims)
    listed = (lambda i: True) if axes is None else (lambda i: i in axes)
    tail: list[tuple[int, ...]] = []
    current: list[int] = []
    product = 1
    for i in reversed(dims[1:]):
        if current and (product * shape[i] > bound or listed(i) != listed(current[0])):
            tail.append(tuple(current))
            current, product = [], 1
        current.insert(0, i)
        product *= shape[i]
    tail.append(tuple(current))
    return ((dims[0],), *reversed(tail))


def merge_small_dims(
    shape: tuple[int, ...], bound: int, axes: tuple[int, ...] | None = None, rule: Rule = "fan_in"
) -> tuple[int, ...]:
    """The merged shape: the product of each of :func:`merge_groups`' groups."""
    out = []
    for group in merge_groups(shape, bound, axes, rule):
        n = 1
        for i in group:
            n *= shape[i]
        out.append(n)
    return tuple(out)


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
    groups: tuple[tuple[int, ...], ...] = ()  # the parameter's dims in each merged axis
    first: int = 0  # the parameter's index of ``blocks[0]`` (not 0 in a plan of some rows: ``rows_plan``)

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
    axes: tuple[int, ...] | None = None,
    rule: Rule = "fan_in",
) -> BlockPlan:
    """The plan of a ``shape`` parameter. ``axes``: the dims that may keep statistics
    (sorted, non-negative, see :func:`normalize_axes`; ``None``: all of them)."""
    if 0 in shape:
        return BlockPlan(shape, (0,), ())
    groups = merge_groups(shape, merge_bound, axes, rule)
    merged = merge_small_dims(shape, merge_bound, axes, rule)
    listed = [axes is None or all(i in axes for i in g) for g in groups]
    allowed = [d <= max_preconditioner_dim and ok for d, ok in zip(merged, listed)]
    if len(merged) == 1 and not precondition_1d:
        allowed = [False]
    chunks = []
    for d, ok in zip(merged, allowed):
        starts = range(0, d, block_size) if ok else range(0, d, d)
        chunks.append([slice(s, min(s + block_size, d) if ok else d) for s in starts])
    blocks = []
    for index in itertools.product(*chunks):
        bshape = tuple(s.stop - s.start for s in index)
        kept = tuple(i for i, (n, ok) in enumerate(zip(bshape, allowed)) if ok and n > 1)
        blocks.append(Block(tuple(index), bshape, kept))
    return BlockPlan(tuple(shape), merged, tuple(blocks), groups)


def row_units(plan: BlockPlan) -> list[tuple[int, int]]:
    """The row ranges of the merged tensor's axis 0 that no block crosses, in order: where
    a parameter may be cut between ranks (ZeRO-1) without changing any block. One range
    (or none) where axis 0 is not split into blocks, which keeps the parameter whole."""
    if not plan.blocks or not plan.merged:
        return []
    return sorted({(b.index[0].start, b.index[0].stop) for b in plan.blocks})


def rows_plan(plan: BlockPlan, lo: int, hi: int) -> BlockPlan:
    """The plan of rows ``lo … hi-1`` of the merged tensor (bounds of :func:`row_units`):
    the same blocks, with their rows counted from ``lo``; ``first`` is the parameter's
    index of the first of them, so their state keys are the whole parameter's."""
    if (lo, hi) == (0, plan.merged[0]) and not plan.first:
        return plan
    inside = [(b, blk) for b, blk in enumerate(plan.blocks) if lo <= blk.index[0].start and blk.index[0].stop <= hi]
    blocks = tuple(Block((slice(blk.index[0].start - lo, blk.index[0].stop - lo), *blk.index[1:]), blk.shape, blk.axes)
                   for _, blk in inside)  # fmt: skip
    shape = (hi - lo, *plan.merged[1:])
    return BlockPlan(shape, shape, blocks, plan.groups, plan.first + inside[0][0])


def block_views(t: Tensor, plan: BlockPlan) -> list[Tensor]:
    """Views of each block of a contiguous tensor shaped like the parameter.

    Writing into a view writes into ``t``, so merging blocks back is a write
    into these views of the output.
    """
    merged = t.view(plan.merged) if plan.blocks else t
    return [merged[b.index] for b in plan.blocks]

