"""The per-block engine: blocks stacked in buckets, the only place the block math runs.

Blocks of every parameter that share a shape, preconditioned axes and a
:class:`Spec` (dtypes, device, and the two hyperparameters baked into the stacked
math: β₂ and whether P is rescaled) form a :class:`Bucket`. Per axis a bucket keeps a
statistics stack ``[B, n, n]`` and a roots stack ``[B, n, n]``, so a step is a
handful of batched ops per bucket, each formula from ``kronecker.py`` or
``grafting.py``::

    G ← gather(blocks of the gradients)          one copy
    H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ                    accumulate_statistics_ (torch.baddbmm)
    P ← Ĝ ×ₐ H_a^(-1/p);  P ← P·‖D‖/‖P‖           grafted_direction (torch.bmm, norms per block)
    P ← D where a block has no roots yet          the has-root mask
    scatter(P)                                   one copy back

With ``preconditioner="eigenvalue_corrected"`` the roots stacks hold the bases Q (state
``basis.{b}.{a}``) and :meth:`Buckets.directions` runs ``eigen.py``'s step instead of the
contraction: G̃ = G ×ₐ Q_aᵀ, V ← β₂V + w·G̃², P = (Ĝ ×ₐ Q_aᵀ)/(√V̂ + ε) ×ₐ Q_a, with V
gathered from and scattered back to the per-parameter ``exp_avg_sq``.

``batched=False`` gives every block a bucket of its own (a stack of one): the
per-block reference that the stacking is tested against runs the same code.

The contract with the optimizer: :meth:`Buckets.bind` makes the per-block entries
``stat.{b}.{a}`` and ``root.{b}.{a}`` of ``optimizer.state[p]`` (``state.py``)
*views* of the stacks, so ``state_dict()`` stays per parameter and ``torch.save``
stores each stack once; :meth:`Buckets.install_root` writes a new root into its
stack and returns the view for the state. ``root.{b}.{a}`` appears only once a
root is installed. The buckets are rebuilt (re-stacked, views re-pointed) only
when the parameters with a gradient, their plans or specs change, and after
``load_state_dict`` or ``add_param_group``: lr, β₁, ε, weight decay or momentum
(which a scheduler may change every step) never rebuild anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .blocks import BlockPlan
from .eigen import corrected_direction
from .grafting import grafted_direction, rescale_
from .kronecker import accumulate_statistics_
from .state import basis_key, root_key, stat_key

__all__ = ["Bucket", "Buckets", "Corrected", "Entry", "Spec"]


class Spec(NamedTuple):
    """What a parameter's blocks must share, besides their shape and axes, to be stacked."""

    dtype: torch.dtype  # of the statistics and the stacked work (fp32, or fp64 for fp64 params)
    device: torch.device
    root_dtype: torch.dtype  # the installed roots' storage (``root_storage_dtype``)
    beta2: float
    rescale: bool  # P ← P·‖D‖/‖P‖ (every grafting type but ``none``)
    eigen_p: int = 0  # eigenvalue-corrected with V^(1/p) (``eigen.py``); 0: the root preconditioner
    rotated_m: bool = False  # eigenvalue-corrected with ``first_moment_basis="rotated"``


class Entry(NamedTuple):
    """What one parameter with a gradient brings to the engine."""

    p: Tensor
    plan: BlockPlan
    spec: Spec


class Corrected(NamedTuple):
    """What an eigenvalue-corrected parameter brings to :meth:`Buckets.directions`."""

    adam: Tensor  # the update with no basis (identity): Ĝ/(√V̂ + ε), Adam's
    v: Tensor  # the stored second moment V (read only)
    v_new: Tensor  # V's update with no basis, β₂V + w·G²; blocks with a basis are written into it
    eps: float
    bias: float  # (1 − β₂ᵗ)^(1/p), or 1 when β₂ = 1
    m: Tensor | None = None  # ``first_moment_basis="rotated"``: the stored M, per block in its basis
    m_new: Tensor | None = None  # M's update with no basis; blocks with a basis are written into it
    beta1: float = 0.0
    bias1: float = 1.0  # 1 − β₁ᵗ


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

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], spec: Spec, keep_scratch: bool = True) -> None:
        self.shape, self.axes, self.spec, self.keep_scratch = shape, axes, spec, keep_scratch
        self.dtype, self.device = spec.dtype, spec.device
        self.slot = basis_key if spec.eigen_p else root_key  # the state key of what ``roots`` holds
        self.members: list[Member] = []
        self.rows = 0
        self.stats: dict[int, Tensor] = {}
        self.roots: dict[int, Tensor] = {}
        self.installed: list[set[int]] = []  # per row: the axes with a root
        self.ready = 0  # rows with a root on every axis
        self._mask: Tensor | None = None
        self._work: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- layout
    def build(self, state: Any) -> None:
        """Stack the members' statistics and roots, and point the state entries at the stacks."""
        self.installed = [set() for _ in range(self.rows)]
        for a in self.axes:
            n = self.shape[a]
            self.stats[a] = torch.zeros(self.rows, n, n, dtype=self.dtype, device=self.device)
            self.roots[a] = torch.zeros(self.rows, n, n, dtype=self.spec.root_dtype, device=self.device)
            for m in self.members:
                st = state[m.p]
                for row, b in enumerate(m.blocks, m.lo):
                    if (s := st.get(stat_key(b, a))) is not None:
                        self.stats[a][row].copy_(s)
                    st[stat_key(b, a)] = self.stats[a][row]
                    if (r := st.get(self.slot(b, a))) is not None:
                        self.roots[a][row].copy_(r)
                        st[self.slot(b, a)] = self.roots[a][row]
                        self.installed[row].add(a)
        self.ready = sum(len(s) == len(self.axes) for s in self.installed)

    def release(self, state: Any) -> None:
        """Give every state entry that is still a view of these stacks its own storage."""
        stacks = [*self.stats.values(), *self.roots.values()]
        for m in self.members:
            st = state.get(m.p, {})
            for b in m.blocks:
                for a in self.axes:
                    for key in (stat_key(b, a), self.slot(b, a)):
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
        """A ``[B, *block]`` scratch stack, kept between steps on a CPU (a fresh large tensor
        costs page faults on every touch; CUDA's allocator recycles memory anyway)."""
        if self.device.type != "cpu" or not self.keep_scratch:
            return torch.empty((self.rows, *self.shape), dtype=self.dtype, device=self.device)
        if name not in self._work:
            self._work[name] = torch.empty((self.rows, *self.shape), dtype=self.dtype, device=self.device)
        return self._work[name]

    def gather(self, tensors: list[Tensor], buf: Tensor) -> Tensor:
        """Fill ``buf`` with the ``[B, *block]`` stack of the members' blocks of ``tensors[pos]``."""
        self._copy(buf, [tensors[m.pos].contiguous() for m in self.members], into_stack=True)
        return buf

    def scatter(self, stack: Tensor, outs: list[Tensor]) -> None:
        """Write each row of ``stack`` into its block of ``outs[pos]`` (contiguous tensors)."""
        self._copy(stack, [outs[m.pos] for m in self.members], into_stack=False)

    def _copy(self, stack: Tensor, tensors: list[Tensor], into_stack: bool) -> None:
        """Copy between the rows of ``stack`` and the members' blocks of ``tensors`` (one per member)."""
        rows, blocks = [], []
        for m, t in zip(self.members, tensors):
            if m.tiled:  # one strided copy for all of the member's blocks
                tiles, part = m.tiles(t, self.shape), stack[m.lo : m.lo + len(m.blocks)]
                part.view(tiles.shape).copy_(tiles) if into_stack else tiles.copy_(part.view(tiles.shape))
            else:  # views of the member's blocks only (a bucket per block must not cut them all)
                merged = t.view(m.plan.merged)
                rows += [stack[row] for row in range(m.lo, m.lo + len(m.blocks))]
                blocks += [merged[m.plan.blocks[b].index] for b in m.blocks]
        if rows:
            torch._foreach_copy_(rows, blocks) if into_stack else torch._foreach_copy_(blocks, rows)

    # ---------------------------------------------------------------- the math
    def update_statistics(self, grads: list[Tensor]) -> Tensor:
        """H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ for every block; returns the gathered G (a scratch stack)."""
        g = self.gather(grads, self.work("g"))
        for a in self.axes:
            accumulate_statistics_(self.stats[a], g, a, self.spec.beta2)
        return g

    def direction(self, x: Tensor, d: Tensor) -> Tensor:
        """P for every block: preconditioned and rescaled where the block has roots, else D.

        ``x`` (Ĝ) and ``d`` (D) are this step's gathered stacks; ``x`` is overwritten.
        """
        work = (self.work("mid"), self.work("pre")) if self.device.type == "cpu" else None
        roots = {a: r.to(x.dtype) for a, r in self.roots.items()}  # the same tensors unless stored in bf16
        if self.spec.rescale and x is d:  # x is scaled in place: keep D
            d = self.work("d").copy_(x)
        pre = grafted_direction(x, d, roots, self.spec.rescale, work)
        if self.ready == self.rows:
            return pre
        return torch.where(self.mask(), pre, d, out=pre)

    def corrected(
        self, g: Tensor, x: Tensor, d: Tensor, v: Tensor, eps: Tensor, bias: Tensor,
        m: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """P for every block by the eigenvalue-corrected step (``eigen.py``), V updated in ``v``
        (and a rotated M in ``m``); rescaled to ‖D‖ per block with grafting. Rows without a full
        basis are the caller's."""
        work = (self.work("mid"), self.work("pre")) if self.device.type == "cpu" else None
        bases = {a: q.to(x.dtype) for a, q in self.roots.items()}  # the same tensors unless stored in bf16
        pre = corrected_direction(g, x, v, bases, self.spec.beta2, bias, eps, self.spec.eigen_p, work, m)
        return rescale_(pre, d) if self.spec.rescale else pre

    def per_row(self, values: list[float]) -> Tensor:
        """``[B, 1, …]``: each member's value (indexed by position) on each of its rows."""
        rows = [values[m.pos] for m in self.members for _ in m.blocks]
        return torch.tensor(rows, dtype=self.dtype, device=self.device).view(-1, *(1,) * len(self.shape))


class Buckets:
    """All buckets of an optimizer, rebuilt only when what they were built from changes."""

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

    def bind(self, state: Any, entries: list[Entry], batched: bool) -> None:
        """Stack the blocks of ``entries`` (this step's parameters with a gradient) and make
        their ``stat``/``root`` state entries views of the stacks; nothing if unchanged.

        ``batched``: equal blocks of all parameters share a bucket; else one bucket per block.
        """
        signature = [(id(e.p), e.plan, e.spec) for e in entries] + [(batched,)]
        if signature == self.signature:
            return
        for bucket in self.buckets:
            bucket.release(state)
        found: dict[tuple[Any, ...], Bucket] = {}
        for pos, e in enumerate(entries):
            tiled = len({blk.shape for blk in e.plan.blocks}) == 1
            per_bucket: dict[tuple[Any, ...], list[int]] = {}
            for b, blk in enumerate(e.plan.blocks):
                if blk.axes:
                    key = (blk.shape, blk.axes, e.spec)
                    per_bucket.setdefault(key if batched else (*key, pos, b), []).append(b)
            for key, blocks in per_bucket.items():
                bucket = found.get(key) or found.setdefault(key, Bucket(*key[:3], keep_scratch=batched))
                bucket.members.append(Member(pos, e.p, e.plan, blocks, bucket.rows, tiled and batched))
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

    def update_statistics(self, grads: list[Tensor]) -> list[Tensor]:
        """H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ for every bucketed block; the gathered G of each bucket."""
        return [bucket.update_statistics(grads) for bucket in self.buckets]

    def directions(
        self, gathered: list[Tensor], grads: list[Tensor], xs: list[Tensor], ds: list[Tensor],
        corrected: list[Corrected | None] | None = None,
    ) -> list[Tensor]:  # fmt: skip
        """P of every parameter: D, with P written into the blocks that have roots.

        ``gathered``: G per bucket, from :meth:`update_statistics`. Buckets hold disjoint
        blocks, so one bucket's writes never change what another gathers. ``corrected``:
        per parameter, None, or what its eigenvalue-corrected step needs; such a parameter's
        P is ``adam``, with the corrected P written into the blocks with a full basis (and
        their V into ``v_new``)."""
        ec = corrected or [None] * len(grads)
        # contiguous, and never the gradient itself: P is written into them
        outs = [
            c.adam if c is not None else d.clone(memory_format=torch.contiguous_format) if d is g else d.contiguous()
            for d, g, c in zip(ds, grads, ec)
        ]
        for bucket, g in zip(self.buckets, gathered, strict=True):
            if not bucket.ready:
                continue
            if bucket.spec.eigen_p:
                self._corrected(bucket, g, grads, xs, ds, outs, ec)
                continue
            same_x = all(xs[m.pos] is grads[m.pos] for m in bucket.members)
            # x may take g's stack: the statistics are done with it
            x = g if same_x else bucket.gather(xs, bucket.work("g"))
            d = x if all(ds[m.pos] is xs[m.pos] for m in bucket.members) else bucket.gather(ds, bucket.work("d"))
            bucket.scatter(bucket.direction(x, d), outs)
        return outs

    @staticmethod
    def _corrected(
        bucket: Bucket, g: Tensor, grads: list[Tensor], xs: list[Tensor], ds: list[Tensor], outs: list[Tensor],
        ec: list[Corrected | None],
    ) -> None:  # fmt: skip
        """The eigenvalue-corrected P and V of one bucket's blocks, scattered into ``outs`` and ``v_new``."""
        vs = [c.v if c is not None else g for c in ec]
        v_new = [c.v_new if c is not None else g for c in ec]
        same_x = all(xs[m.pos] is grads[m.pos] for m in bucket.members)  # β₁ = 0: Ĝ is G
        x = g if same_x else bucket.gather(xs, bucket.work("x"))
        d = bucket.gather(ds, bucket.work("d")) if bucket.spec.rescale else x
        v = bucket.gather(vs, bucket.work("v"))
        eps = bucket.per_row([c.eps if c is not None else 0.0 for c in ec])
        bias = bucket.per_row([c.bias if c is not None else 1.0 for c in ec])
        m = None
        if bucket.spec.rotated_m:  # every member's M is in its blocks' bases
            ms = [c.m if c is not None and c.m is not None else g for c in ec]
            m = (bucket.gather(ms, bucket.work("m")), bucket.per_row([1 - c.beta1 if c else 1.0 for c in ec]),
                 bucket.per_row([c.bias1 if c is not None else 1.0 for c in ec]))  # fmt: skip
        pre = bucket.corrected(g, x, d, v, eps, bias, m)
        if bucket.ready < bucket.rows:  # rows without a full basis keep Adam's P and V
            mask = bucket.mask()
            pre = torch.where(mask, pre, bucket.gather(outs, bucket.work("d")))
            v = torch.where(mask, v, bucket.gather(v_new, bucket.work("x")))
        bucket.scatter(pre, outs)
        bucket.scatter(v, v_new)
        if m is not None:
            m_new = [c.m_new if c is not None and c.m_new is not None else g for c in ec]
            if bucket.ready < bucket.rows:
                m = (torch.where(bucket.mask(), m[0], bucket.gather(m_new, bucket.work("x"))), *m[1:])
            bucket.scatter(m[0], m_new)
