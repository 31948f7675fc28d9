"""Equal blocks stacked: the batched hot path of ``Shampoo(batched=True)``.

Blocks of every parameter that share a shape, preconditioned axes, state dtype,
device and the hyperparameters of the stacked math (β₂, grafting) form a
:class:`Bucket`. Per axis a bucket keeps a statistics stack ``[B, n, n]`` and a
roots stack ``[B, n, n]``, so a step is a handful of batched ops per bucket::

    G ← gather(blocks of the gradients)          one copy
    H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ                    torch.baddbmm
    P ← Ĝ ×ₐ H_a^(-1/p);  P ← P·‖D‖/‖P‖           torch.bmm; norms over the block dims
    P ← D where a block has no roots yet          the has-root mask
    scatter(P)                                   one copy back

The per-block entries ``stat.{b}.{a}`` and ``root.{b}.{a}`` of ``state.py`` stay in
``optimizer.state[p]`` as *views* of the stacks: ``state_dict()`` is per parameter
and ``torch.save`` stores each stack once. ``root.{b}.{a}`` appears, as in the plain
path, only once a root is installed. The buckets are built lazily and rebuilt
(re-stacked, views re-pointed) when the parameters with a gradient, their plans
or hyperparameters change, and after ``load_state_dict`` or ``add_param_group``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockPlan, block_views
from .kronecker import stacked_precondition, stacked_unfolding

__all__ = ["Bucket", "Buckets"]

# what a parameter brings to the buckets:
# (p, plan, state dtype, device, (β₂, grafting, exponent_override, root_storage_dtype))
Entry = tuple[Tensor, BlockPlan, torch.dtype, torch.device, tuple[Any, ...]]


@dataclass
class Member:
    """Blocks ``blocks`` of one parameter, rows ``lo …`` of its bucket's stacks."""

    pos: int  # index into the step's list of parameters with a gradient
    p: Tensor
    plan: BlockPlan
    blocks: list[int]
    lo: int
    tiled: bool  # all the parameter's blocks, all equal: gathered with one strided copy

    def tiles(self, t: Tensor, block: tuple[int, ...]) -> Tensor:
        """A view ``[c₀, c₁, …, s₀, s₁, …]`` of the blocks of ``t`` (tiled members only)."""
        k = len(block)
        split = [n for d, s in zip(self.plan.merged, block) for n in (d // s, s)]
        return t.view(split).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))


class Bucket:
    """Equal blocks of any number of parameters, with stacked statistics and roots."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 hyper: tuple[Any, ...]) -> None:  # fmt: skip
        self.shape, self.axes, self.dtype, self.device = shape, axes, dtype, device
        beta2 = hyper[0]
        self.beta2, self.w = beta2, 1.0 if beta2 == 1 else 1.0 - beta2
        self.rescale = hyper[1] != "none"  # grafting NONE keeps Shampoo's own scale
        self.root_dtype = hyper[3] or dtype  # the roots' storage (root_storage_dtype)
        self.members: list[Member] = []
        self.rows = 0
        self.stats: dict[int, Tensor] = {}
        self.roots: dict[int, Tensor] = {}
        self.installed: list[set[int]] = []  # per row: the axes with a root
        self.ready = 0  # rows with a root on every axis
        self._mask: Tensor | None = None
        self.g: Tensor | None = None  # this step's gathered gradient, between the two stages
        self._work: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- layout
    def build(self, state: Any) -> None:
        """Stack the members' statistics and roots, and point the state entries at the stacks."""
        self.installed = [set() for _ in range(self.rows)]
        for a in self.axes:
            n = self.shape[a]
            self.stats[a] = torch.zeros(self.rows, n, n, dtype=self.dtype, device=self.device)
            self.roots[a] = torch.zeros(self.rows, n, n, dtype=self.root_dtype, device=self.device)
            for m in self.members:
                st = state[m.p]
                for row, b in enumerate(m.blocks, m.lo):
                    if (s := st.get(f"stat.{b}.{a}")) is not None:
                        self.stats[a][row].copy_(s)
                    st[f"stat.{b}.{a}"] = self.stats[a][row]
                    if (r := st.get(f"root.{b}.{a}")) is not None:
                        self.roots[a][row].copy_(r)
                        st[f"root.{b}.{a}"] = self.roots[a][row]
                        self.installed[row].add(a)
        self.ready = sum(len(s) == len(self.axes) for s in self.installed)

    def release(self, state: Any) -> None:
        """Give every state entry that is still a view of these stacks its own storage."""
        stacks = [*self.stats.values(), *self.roots.values()]
        for m in self.members:
            st = state.get(m.p, {})
            for b in m.blocks:
                for a in self.axes:
                    for key in (f"stat.{b}.{a}", f"root.{b}.{a}"):
                        t = st.get(key)
                        if t is not None and any(t._base is s for s in stacks):
                            st[key] = t.clone()

    def install(self, row: int, axis: int, root: Tensor) -> Tensor:
        """Copy ``root`` into the stack; returns the view that the state entry holds."""
        view = self.roots[axis][row]
        view.copy_(root)
        if axis not in self.installed[row]:
            self.installed[row].add(axis)
            self.ready += len(self.installed[row]) == len(self.axes)
            self._mask = None
        return view

    def mask(self) -> Tensor:
        """[B, 1, …] bool: which rows have a root on every axis (rebuilt only when that changes)."""
        if self._mask is None:
            flags = [len(s) == len(self.axes) for s in self.installed]
            shape = (self.rows,) + (1,) * len(self.shape)
            self._mask = torch.tensor(flags, device=self.device).view(shape)
        return self._mask

    # ---------------------------------------------------------------- gather / scatter
    def work(self, name: str) -> Tensor:
        """A ``[B, *block]`` scratch stack. Kept from step to step on a CPU, where a fresh
        large tensor costs page faults on every touch (more than the ops on it);
        elsewhere the caching allocator already recycles memory."""
        if self.device.type != "cpu":
            return torch.empty((self.rows, *self.shape), dtype=self.dtype, device=self.device)
        if name not in self._work:
            self._work[name] = torch.empty((self.rows, *self.shape), dtype=self.dtype, device=self.device)
        return self._work[name]

    def gather(self, tensors: list[Tensor], buf: Tensor) -> Tensor:
        """Fill ``buf`` with the ``[B, *block]`` stack of the members' blocks of ``tensors[pos]``."""
        dst, src = [], []
        for m in self.members:
            t = tensors[m.pos].contiguous()
            if m.tiled:
                tiles = m.tiles(t, self.shape)
                buf[m.lo : m.lo + len(m.blocks)].view(tiles.shape).copy_(tiles)
            else:
                views = block_views(t, m.plan)
                dst += [buf[row] for row in range(m.lo, m.lo + len(m.blocks))]
                src += [views[b] for b in m.blocks]
        if dst:
            torch._foreach_copy_(dst, src)
        return buf

    def scatter(self, stack: Tensor, outs: list[Tensor]) -> None:
        """Write each row of ``stack`` into its block of ``outs[pos]`` (contiguous tensors)."""
        dst, src = [], []
        for m in self.members:
            t = outs[m.pos]
            if m.tiled:
                tiles = m.tiles(t, self.shape)
                tiles.copy_(stack[m.lo : m.lo + len(m.blocks)].view(tiles.shape))
            else:
                views = block_views(t, m.plan)
                dst += [views[b] for b in m.blocks]
                src += [stack[row] for row in range(m.lo, m.lo + len(m.blocks))]
        if dst:
            torch._foreach_copy_(dst, src)

    # ---------------------------------------------------------------- the math
    def update_statistics(self, grads: list[Tensor]) -> None:
        """H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ for every block, one ``baddbmm`` per axis."""
        self.g = g = self.gather(grads, self.work("g"))
        for a in self.axes:
            u = stacked_unfolding(g, a)
            self.stats[a].baddbmm_(u, u.mT, beta=self.beta2, alpha=self.w)

    def direction(self, x: Tensor, d: Tensor) -> Tensor:
        """P ← Ĝ ×ₐ H_a^(-1/p);  P ← P·‖D‖/‖P‖ per block; P = D for a block without roots.

        Ĝ is pre-scaled by its max per block, as in the plain path: the same P, no overflow.
        """
        work = (self.work("mid"), self.work("pre")) if self.device.type == "cpu" else None
        roots = {a: r.to(x.dtype) for a, r in self.roots.items()}  # the same tensors unless stored in bf16
        if not self.rescale:
            pre = stacked_precondition(x, roots, work)
        else:  # x and d are this step's gathered copies: x is scaled in place (d is kept)
            d = self.work("d").copy_(x) if x is d else d
            dims = tuple(range(1, x.dim()))
            tiny = torch.finfo(x.dtype).tiny
            d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
            x_max = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
            pre = stacked_precondition(x.div_(x_max.clamp_min_(tiny)), roots, work)
            pre = pre.mul_(d_norm.div_(torch.linalg.vector_norm(pre, dim=dims, keepdim=True).clamp_min_(tiny)))
        if self.ready == self.rows:
            return pre
        return torch.where(self.mask(), pre, d, out=pre)


class Buckets:
    """All buckets of an optimizer, rebuilt lazily when what they were built from changes."""

    def __init__(self) -> None:
        self.buckets: list[Bucket] = []
        self.signature: list[tuple[Any, ...]] | None = None
        self.where: dict[tuple[int, int], tuple[Bucket, int]] = {}  # (id(p), block) → (bucket, row)
        self.builds = 0  # how many times the buckets were (re)built

    def invalidate(self) -> None:
        self.signature = None

    def scratch(self) -> list[Tensor]:
        """The scratch stacks kept between steps (for the memory report)."""
        return [t for bucket in self.buckets for t in bucket._work.values()]

    def refresh(self, state: Any, entries: list[Entry]) -> None:
        """Rebuild the buckets unless ``entries`` (the parameters with a gradient) are unchanged."""
        signature = [(id(p), plan, dtype, device, hyper) for p, plan, dtype, device, hyper in entries]
        if signature == self.signature:
            return
        for bucket in self.buckets:
            bucket.release(state)
        found: dict[tuple[Any, ...], Bucket] = {}
        for pos, (p, plan, dtype, device, hyper) in enumerate(entries):
            tiled = len({blk.shape for blk in plan.blocks}) == 1
            per_bucket: dict[tuple[Any, ...], list[int]] = {}
            for b, blk in enumerate(plan.blocks):
                if blk.axes:
                    per_bucket.setdefault((blk.shape, blk.axes, dtype, device, hyper), []).append(b)
            for key, blocks in per_bucket.items():
                bucket = found.get(key) or found.setdefault(key, Bucket(key[0], key[1], dtype, device, hyper))
                bucket.members.append(Member(pos, p, plan, blocks, bucket.rows, tiled))
                bucket.rows += len(blocks)
        self.buckets = list(found.values())
        self.where = {}
        for bucket in self.buckets:
            bucket.build(state)
            for m in bucket.members:
                self.where |= {(id(m.p), b): (bucket, row) for row, b in enumerate(m.blocks, m.lo)}
        self.signature = signature
        self.builds += 1

    def install_root(self, p: Tensor, block: int, axis: int, root: Tensor) -> Tensor | None:
        """The state entry for a new root of a bucketed block (a view of its stack), else None."""
        found = self.where.get((id(p), block))
        return found[0].install(found[1], axis, root) if found is not None else None

    def update_statistics(self, grads: list[Tensor]) -> None:
        for bucket in self.buckets:
            bucket.update_statistics(grads)

    def directions(self, grads: list[Tensor], xs: list[Tensor], ds: list[Tensor], outs: list[Tensor]) -> None:
        """Write P into the blocks of ``outs`` that have roots (``outs`` starts as D).

        Buckets hold disjoint blocks, so writing one bucket's rows into ``outs``
        never changes what another bucket gathers, even where ``outs[i] is ds[i]``.
        """
        for bucket in self.buckets:
            g, bucket.g = bucket.g, None
            if not bucket.ready:
                continue
            same_x = all(xs[m.pos] is grads[m.pos] for m in bucket.members)
            # x may take g's stack: the statistics are done with it
            x = g if same_x and g is not None else bucket.gather(xs, bucket.work("g"))
            d = x if all(ds[m.pos] is xs[m.pos] for m in bucket.members) else bucket.gather(ds, bucket.work("d"))
            bucket.scatter(bucket.direction(x, d), outs)
