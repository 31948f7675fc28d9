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
``basis.{b}.{a}``) and :meth:`Bucket.correct` runs ``eigen.py``'s step instead of the
contraction: G̃ = G ×ₐ Q_aᵀ, V ← β₂V + w·G̃², P = (Ĝ ×ₐ Q_aᵀ)/(√V̂ + ε) ×ₐ Q_a, with V
gathered from and scattered back to the per-parameter ``exp_avg_sq``.

With ``packed_storage`` (``Spec.packed``) a statistics stack holds each H in its lower
triangle and the root's strict upper triangle above it, and the roots stack only the roots'
diagonals ``[B, n]`` (``kronecker.pack_root_``): the statistic update goes through the
``mat`` scratch and copies back the lower triangle, and each root is unpacked into that
scratch when the contraction reads it (:class:`Unpacked`); chunks are then at most
:data:`PACKED_CHUNK_ELEMENTS`.

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

**Memory.** Statistics and roots are stored once, in the stacks (the state entries
view them). A bucket is worked on in *chunks* of consecutive rows of at most
:data:`CHUNK_ELEMENTS` elements (at least one unit: a block, or one slice along the
first tile axis of a parameter gathered with one strided copy), and every chunk
of every bucket works in the same three scratch buffers (``x``, ``d``, ``mid``) of
:class:`Scratch`, sized to the largest chunk. So the scratch kept between steps is
3 chunks, not 4 stacks the size of the parameters (the eigenvalue-corrected step
also gathers G, V and a rotated M: up to 6 chunks). Every row's math is unchanged
(batched matmuls compute each row alone), so chunking changes no bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .blocks import BlockPlan
from .eigen import corrected_direction
from .grafting import grafted_direction, rescale_
from .kronecker import accumulate_statistics_, pack_root_, unpack_root
from .state import basis_key, diag_key, packed_key, root_key, stat_key

__all__ = ["CHUNK_ELEMENTS", "PACKED_CHUNK_ELEMENTS", "Bucket", "Buckets", "Corrected", "Entry", "Scratch", "Spec"]

# A bucket is gathered, preconditioned and scattered in chunks of rows of at most this
# many elements (16 MiB in fp32), or one unit where a unit is larger (see ``Bucket._plan_chunks``).
# Smaller chunks (2^18, 2^20) made the step slower at 2 threads (more, smaller batched matmuls,
# each a parallel region); at 2^22 it was as fast as one chunk per bucket.
CHUNK_ELEMENTS = 1 << 22
# With ``packed_storage`` (memory first), chunks of at most this many elements (1 MiB in fp32).
PACKED_CHUNK_ELEMENTS = 1 << 18


class Spec(NamedTuple):
    """What a parameter's blocks must share, besides their shape and axes, to be stacked."""

    dtype: torch.dtype  # of the statistics and the stacked work (fp32, or fp64 for fp64 params)
    device: torch.device
    root_dtype: torch.dtype  # the installed roots' storage (``root_storage_dtype``)
    beta2: float
    rescale: bool  # P ← P·‖D‖/‖P‖ (every grafting type but ``none``)
    eigen_p: int = 0  # eigenvalue-corrected with V^(1/p) (``eigen.py``); 0: the root preconditioner
    rotated_m: bool = False  # eigenvalue-corrected with ``first_moment_basis="rotated"``
    packed: bool = False  # ``packed_storage``: H and its root in one matrix (``kronecker.pack_root_``)


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
    # the member's rows in units that a chunk never cuts: a tiled member's slices along its first
    # tile axis (``per`` rows each), else its blocks one by one (``per`` = 1)
    units: int = 0
    per: int = 1

    def tiles(self, t: Tensor, block: tuple[int, ...]) -> Tensor:
        """A view ``[c₀, c₁, …, s₀, s₁, …]`` of the blocks of ``t`` (tiled members only)."""
        k = len(block)
        split = [n for d, s in zip(self.plan.merged, block) for n in (d // s, s)]
        return t.view(split).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))


class Chunk(NamedTuple):
    """Rows ``lo … hi-1`` of a bucket: ``pieces`` are (member, first unit, end unit), in row order."""

    lo: int
    hi: int
    pieces: list[tuple[Member, int, int]]


class Scratch:
    """The work buffers that every chunk of every bucket reuses, kept between steps (a fresh
    large tensor costs page faults on every touch on a CPU). One flat buffer per name, dtype
    and device, sized at :meth:`Buckets.bind` to the largest chunk; a chunk takes a view of
    its front. Three names: ``x`` (the gathered G, then Ĝ, then P), ``d`` (D) and ``mid`` (R₀·Ĝ)."""

    def __init__(self) -> None:
        self.sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def resize(self, sizes: dict[tuple[torch.dtype, torch.device], int]) -> None:
        """Set the elements each buffer will have; buffers of another size are dropped."""
        self.sizes = sizes
        self.buffers = {k: b for k, b in self.buffers.items() if b.numel() == sizes.get(k[1:])}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A ``shape`` view of buffer ``name`` (its contents are whatever the last user left)."""
        n, key = math.prod(shape), (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            size = max(n, self.sizes.get((dtype, device), 0))
            buf = self.buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:n].view(shape)


class Bucket:
    """Equal blocks of any number of parameters, with stacked statistics and roots."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], spec: Spec) -> None:
        self.shape, self.axes, self.spec = shape, axes, spec
        self.dtype, self.device = spec.dtype, spec.device
        # the state keys of what ``stats`` and ``roots`` hold; packed: H with the root's strict upper
        # triangle, and the root's diagonal ([B, n])
        self.stat_slot = packed_key if spec.packed else stat_key
        self.slot = diag_key if spec.packed else basis_key if spec.eigen_p else root_key
        self.upper: dict[int, Tensor] = {}  # packed: per axis, the [n, n] mask of the strict upper triangle
        self.members: list[Member] = []
        self.rows = 0
        self.chunks: list[Chunk] = []
        self.stats: dict[int, Tensor] = {}
        self.roots: dict[int, Tensor] = {}
        self.installed: list[set[int]] = []  # per row: the axes with a root
        self.ready = 0  # rows with a root on every axis
        self._mask: Tensor | None = None
        self._ready_rows: list[int] = []  # per chunk: its rows with a root on every axis

    # ---------------------------------------------------------------- layout
    def build(self, state: Any) -> None:
        """Stack the members' statistics and roots, and point the state entries at the stacks."""
        self.installed = [set() for _ in range(self.rows)]
        for a in self.axes:
            n = self.shape[a]
            self.stats[a] = torch.zeros(self.rows, n, n, dtype=self.dtype, device=self.device)
            root_shape = (self.rows, n) if self.spec.packed else (self.rows, n, n)
            self.roots[a] = torch.zeros(root_shape, dtype=self.spec.root_dtype, device=self.device)
            if self.spec.packed:
                self.upper[a] = torch.ones(n, n, dtype=torch.bool, device=self.device).triu_(1)
            for m in self.members:
                st = state[m.p]
                for row, b in enumerate(m.blocks, m.lo):
                    b += m.plan.first  # the parameter's block index (its state key)
                    if (s := st.get(self.stat_slot(b, a))) is not None:
                        self.stats[a][row].copy_(s)
                    st[self.stat_slot(b, a)] = self.stats[a][row]
                    if (r := st.get(self.slot(b, a))) is not None:
                        self.roots[a][row].copy_(r)
                        st[self.slot(b, a)] = self.roots[a][row]
                        self.installed[row].add(a)
        self.ready = sum(len(s) == len(self.axes) for s in self.installed)
        self._plan_chunks()

    def _plan_chunks(self) -> None:
        """Cut the rows into chunks of at most CHUNK_ELEMENTS elements, never inside a unit
        (a unit larger than that is a chunk of its own)."""
        most = PACKED_CHUNK_ELEMENTS if self.spec.packed else CHUNK_ELEMENTS
        limit = max(1, most // math.prod(self.shape))  # rows
        self.chunks = []
        pieces: list[tuple[Member, int, int]] = []
        lo = rows = 0
        for m in self.members:
            u = 0
            while u < m.units:
                take = min(m.units - u, (limit - rows) // m.per)
                if take <= 0:
                    if rows:  # this chunk is full: the unit starts the next one
                        self.chunks.append(Chunk(lo, lo + rows, pieces))
                        pieces, lo, rows = [], lo + rows, 0
                        continue
                    take = 1
                pieces.append((m, u, u + take))
                rows, u = rows + take * m.per, u + take
        if rows:
            self.chunks.append(Chunk(lo, lo + rows, pieces))
        self._mask = None

    def largest_chunk(self) -> int:
        """Elements of the largest chunk (what the scratch buffers must hold)."""
        return max((c.hi - c.lo for c in self.chunks), default=0) * math.prod(self.shape)

    def release(self, state: Any) -> None:
        """Give every state entry that is still a view of these stacks its own storage."""
        stacks = [*self.stats.values(), *self.roots.values()]
        for m in self.members:
            st = state.get(m.p, {})
            for b in m.blocks:
                for a in self.axes:
                    for key in (self.stat_slot(b + m.plan.first, a), self.slot(b + m.plan.first, a)):
                        t = st.get(key)
                        if t is not None and any(t._base is s for s in stacks):
                            st[key] = t.clone()

    def install(self, row: int, axis: int, root: Tensor) -> Tensor:
        """Copy ``root`` into the stack (packed: its strict upper triangle into the statistic's
        matrix, its diagonal into ``roots``); returns the view that the state entry holds."""
        view = self.roots[axis][row]
        view.copy_(pack_root_(self.stats[axis][row], root) if self.spec.packed else root)
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
            self._ready_rows = [sum(flags[c.lo : c.hi]) for c in self.chunks]
        return self._mask

    # ---------------------------------------------------------------- gather / scatter
    def _contiguous(self, tensors: list[Tensor]) -> dict[int, Tensor]:
        """The members' tensors, each made contiguous once for all the chunks."""
        return {m.pos: tensors[m.pos].contiguous() for m in self.members}

    def gather(self, chunk: Chunk, tensors: dict[int, Tensor], buf: Tensor) -> Tensor:
        """Fill ``buf`` with the ``[rows, *block]`` stack of the chunk's blocks of ``tensors[pos]``."""
        self._copy(chunk, buf, tensors, into_stack=True)
        return buf

    def scatter(self, chunk: Chunk, stack: Tensor, outs: list[Tensor]) -> None:
        """Write each row of ``stack`` into its block of ``outs[pos]`` (contiguous tensors)."""
        self._copy(chunk, stack, {m.pos: outs[m.pos] for m, _, _ in chunk.pieces}, into_stack=False)

    def _copy(self, chunk: Chunk, stack: Tensor, tensors: dict[int, Tensor], into_stack: bool) -> None:
        """Copy between the rows of ``stack`` (the chunk's) and their blocks of ``tensors[pos]``."""
        rows, blocks = [], []
        for m, u0, u1 in chunk.pieces:
            t, r0 = tensors[m.pos], m.lo + u0 * m.per - chunk.lo
            if m.tiled:  # one strided copy for the piece's slices of the member's blocks
                tiles = m.tiles(t, self.shape)[u0:u1]
                part = stack[r0 : r0 + (u1 - u0) * m.per].view(tiles.shape)
                part.copy_(tiles) if into_stack else tiles.copy_(part)
            else:  # views of the member's blocks only (a bucket per block must not cut them all)
                merged = t.view(m.plan.merged)
                rows += [stack[r0 + i] for i in range(u1 - u0)]
                blocks += [merged[m.plan.blocks[m.blocks[u]].index] for u in range(u0, u1)]
        if rows:
            torch._foreach_copy_(rows, blocks) if into_stack else torch._foreach_copy_(blocks, rows)

    # ---------------------------------------------------------------- the math
    def _buf(self, scratch: Scratch, name: str, chunk: Chunk) -> Tensor:
        return scratch.get(name, (chunk.hi - chunk.lo, *self.shape), self.dtype, self.device)

    def _mat(self, scratch: Scratch, chunk: Chunk, axis: int) -> Tensor:
        """Packed storage: a ``[rows, n, n]`` scratch stack of the chunk for axis ``axis`` (G·Gᵀ, or
        an unpacked root), one buffer for every axis: each use ends before the next begins."""
        n = self.shape[axis]
        return scratch.get("mat", (chunk.hi - chunk.lo, n, n), self.dtype, self.device)

    def update_statistics(self, grads: list[Tensor], scratch: Scratch) -> None:
        """H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ for every block, chunk by chunk."""
        ts = self._contiguous(grads)
        for c in self.chunks:
            g = self.gather(c, ts, self._buf(scratch, "x", c))
            for a in self.axes:
                packed = (self._mat(scratch, c, a), self.upper[a]) if self.spec.packed else None
                accumulate_statistics_(self.stats[a][c.lo : c.hi], g, a, self.spec.beta2, packed)

    def precondition(self, xs: list[Tensor], ds: list[Tensor], outs: list[Tensor], scratch: Scratch) -> None:
        """Write P into ``outs`` for the blocks with roots, chunk by chunk (the others keep D)."""
        mask = self.mask()
        same = all(ds[m.pos] is xs[m.pos] for m in self.members)
        xt = self._contiguous(xs)
        dt = xt if same else self._contiguous(ds)
        for c, ready in zip(self.chunks, self._ready_rows):
            if not ready:
                continue
            x = self.gather(c, xt, self._buf(scratch, "x", c))
            if not same:
                d = self.gather(c, dt, self._buf(scratch, "d", c))
            elif self.spec.rescale or ready < c.hi - c.lo:  # x receives P: keep D apart
                d = self._buf(scratch, "d", c).copy_(x)
            else:
                d = x  # not read
            pre = self.direction(c, x, d, scratch)
            if ready < c.hi - c.lo:  # P = D where a block has no roots yet
                pre = torch.where(mask[c.lo : c.hi], pre, d, out=pre)
            self.scatter(c, pre, outs)

    def direction(self, chunk: Chunk, x: Tensor, d: Tensor, scratch: Scratch) -> Tensor:
        """P for the chunk's blocks, preconditioned and rescaled as if every block had roots.

        ``x`` (Ĝ) and ``d`` (D) are the chunk's gathered stacks, ``d`` not ``x`` where it is
        read (with rescaling); ``x`` is overwritten and receives P of a matrix block
        (R₀·Ĝ goes to the ``mid`` buffer first)."""
        work = (self._buf(scratch, "mid", chunk), x)
        roots: Mapping[int, Tensor]
        if self.spec.packed:
            roots = Unpacked(self, chunk, scratch)
        else:
            roots = {a: r[chunk.lo : chunk.hi].to(x.dtype) for a, r in self.roots.items()}  # views unless bf16
        return grafted_direction(x, d, roots, self.spec.rescale, work)

    def correct(
        self, grads: list[Tensor], xs: list[Tensor], ds: list[Tensor], outs: list[Tensor],
        ec: list[Corrected | None], scratch: Scratch,
    ) -> None:  # fmt: skip
        """The eigenvalue-corrected P (into ``outs``), V (into ``v_new``) and a rotated M (into
        ``m_new``) of the blocks with a basis on every axis, chunk by chunk; the other blocks
        keep Adam's, which the caller wrote there."""
        mask, rescale = self.mask(), self.spec.rescale
        pick = {m.pos: ec[m.pos] for m in self.members}
        gt = self._contiguous(grads)
        same_x = all(xs[m.pos] is grads[m.pos] for m in self.members)  # β₁ = 0: Ĝ is G
        xt = gt if same_x else self._contiguous(xs)
        dt = self._contiguous(ds) if rescale else {}
        vt = {i: c.v.contiguous() for i, c in pick.items() if c is not None}
        v_new = [c.v_new if c is not None else g for c, g in zip(ec, grads)]
        m_new = [c.m_new if c is not None and c.m_new is not None else g for c, g in zip(ec, grads)]
        mt = {i: c.m.contiguous() for i, c in pick.items() if c is not None and c.m is not None}
        for c, ready in zip(self.chunks, self._ready_rows):
            if not ready:
                continue
            g = self.gather(c, gt, self._buf(scratch, "g", c))
            x = g if same_x else self.gather(c, xt, self._buf(scratch, "x", c))
            v = self.gather(c, vt, self._buf(scratch, "v", c))
            eps = self.per_row(c, {i: e.eps for i, e in pick.items() if e is not None})
            bias = self.per_row(c, {i: e.bias for i, e in pick.items() if e is not None})
            m = None
            if self.spec.rotated_m:  # every member's M is in its blocks' bases
                m = (self.gather(c, mt, self._buf(scratch, "m", c)),
                     self.per_row(c, {i: 1 - e.beta1 for i, e in pick.items() if e is not None}),
                     self.per_row(c, {i: e.bias1 for i, e in pick.items() if e is not None}))  # fmt: skip
            bases = {a: q[c.lo : c.hi].to(x.dtype) for a, q in self.roots.items()}  # views unless bf16
            work = (self._buf(scratch, "mid", c), self._buf(scratch, "d", c))
            pre = corrected_direction(g, x, v, bases, self.spec.beta2, bias, eps, self.spec.eigen_p, work, m)
            if rescale:  # to ‖D‖ per block (grafting); D is gathered after ``d`` took P
                pre = rescale_(pre, self.gather(c, dt, self._buf(scratch, "x" if same_x else "g", c)))
            if ready < c.hi - c.lo:  # rows without a full basis keep Adam's P, V and M
                keep = mask[c.lo : c.hi]
                pre = torch.where(keep, pre, self.gather(c, {m.pos: outs[m.pos] for m in self.members},
                                                         self._buf(scratch, "mid", c)))  # fmt: skip
                v = torch.where(keep, v, self.gather(c, self._contiguous(v_new), self._buf(scratch, "mid", c)))
                if m is not None:
                    m = (torch.where(keep, m[0], self.gather(c, self._contiguous(m_new), self._buf(scratch, "mid", c))),
                         *m[1:])  # fmt: skip
            self.scatter(c, pre, outs)
            self.scatter(c, v, v_new)
            if m is not None:
                self.scatter(c, m[0], m_new)

    def per_row(self, chunk: Chunk, values: dict[int, float]) -> Tensor:
        """``[rows, 1, …]``: each chunk row's member's value (by position in the step's list)."""
        rows = [values[m.pos] for m, u0, u1 in chunk.pieces for _ in range((u1 - u0) * m.per)]
        return torch.tensor(rows, dtype=self.dtype, device=self.device).view(-1, *(1,) * len(self.shape))


class Unpacked(Mapping[int, Tensor]):
    """A packed chunk's roots per axis, each unpacked into the bucket's one ``mat`` scratch stack
    when it is read, so reading one overwrites the one read before. The contraction
    (``kronecker.stacked_precondition``) reads them one at a time, each when its product is
    next: the first root's product is done before the second root is read."""

    def __init__(self, bucket: Bucket, chunk: Chunk, scratch: Scratch) -> None:
        self.bucket, self.chunk, self.scratch = bucket, chunk, scratch

    def __getitem__(self, axis: int) -> Tensor:
        b, c = self.bucket, self.chunk
        if axis not in b.axes:
            raise KeyError(axis)
        out = b._mat(self.scratch, c, axis)
        return unpack_root(b.stats[axis][c.lo : c.hi], b.roots[axis][c.lo : c.hi], b.upper[axis], out)

    def __iter__(self) -> Iterator[int]:
        return iter(self.bucket.axes)

    def __len__(self) -> int:
        return len(self.bucket.axes)


class Buckets:
    """All buckets of an optimizer, rebuilt only when what they were built from changes."""

    def __init__(self) -> None:
        self.buckets: list[Bucket] = []
        self.signature: list[tuple[Any, ...]] | None = None
        self.where: dict[tuple[int, int], tuple[Bucket, int]] = {}  # (id(p), block) → (bucket, row)
        self.builds = 0  # how many times the buckets were (re)built
        self.work = Scratch()  # shared by every chunk of every bucket

    def invalidate(self) -> None:
        self.signature = None

    def scratch(self) -> list[Tensor]:
        """The scratch buffers kept between steps (for the memory report)."""
        return list(self.work.buffers.values())

    def stacks(self) -> list[tuple[str, Tensor]]:
        """(kind, tensor) of every bucket's stacks and mask, for the memory report: a roots
        stack is allocated whole when the bucket is built, before any root is installed."""
        masks = [("other", b._mask) for b in self.buckets if b._mask is not None]
        masks += [("other", u) for b in self.buckets for u in b.upper.values()]
        return [(kind, t) for b in self.buckets
                for kind, d in (("packed" if b.spec.packed else "statistics", b.stats),
                                ("basis" if b.spec.eigen_p else "roots", b.roots))
                for t in d.values()] + masks  # fmt: skip

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
                bucket = found.get(key) or found.setdefault(key, Bucket(*key[:3]))
                m = Member(pos, e.p, e.plan, blocks, bucket.rows, tiled and batched, units=len(blocks))
                if m.tiled:  # units: slices along the first tile axis
                    counts = [d // s for d, s in zip(e.plan.merged, key[0])]
                    m.units, m.per = counts[0], math.prod(counts[1:])
                bucket.members.append(m)
                bucket.rows += len(blocks)
        self.buckets = list(found.values())
        self.where = {}
        for bucket in self.buckets:
            bucket.build(state)
            for m in bucket.members:
                self.where |= {(id(m.p), b + m.plan.first): (bucket, row) for row, b in enumerate(m.blocks, m.lo)}
        sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for bucket in self.buckets:
            at = (bucket.dtype, bucket.device)
            sizes[at] = max(sizes.get(at, 0), bucket.largest_chunk())
        self.work.resize(sizes)
        self.signature = signature
        self.builds += 1

    def install_root(self, p: Tensor, block: int, axis: int, root: Tensor) -> Tensor | None:
        """The state entry for a new root of a bucketed block (a view of its stack), else None."""
        found = self.where.get((id(p), block))
        return found[0].install(found[1], axis, root) if found is not None else None

    def update_statistics(self, grads: list[Tensor]) -> None:
        """H_a ← β₂·H_a + w·G₍ₐ₎G₍ₐ₎ᵀ for every bucketed block."""
        for bucket in self.buckets:
            bucket.update_statistics(grads, self.work)

    def directions(
        self, grads: list[Tensor], xs: list[Tensor], ds: list[Tensor], corrected: list[Corrected | None] | None = None
    ) -> list[Tensor]:
        """P of every parameter: D, with P written into the blocks that have roots.

        Buckets (and chunks) hold disjoint blocks, so one's writes never change what
        another gathers. ``corrected``: per parameter, None, or what its eigenvalue-corrected
        step needs; such a parameter's P is ``adam``, with the corrected P written into the
        blocks with a full basis (and their V into ``v_new``)."""
        ec = corrected or [None] * len(grads)
        # contiguous, and never the gradient itself: P is written into them
        outs = [
            c.adam.contiguous() if c is not None
            else d.clone(memory_format=torch.contiguous_format) if d is g else d.contiguous()
            for d, g, c in zip(ds, grads, ec)
        ]  # fmt: skip
        for bucket in self.buckets:
            if not bucket.ready:
                continue
            if bucket.spec.eigen_p:
                bucket.correct(grads, xs, ds, outs, ec, self.work)
            else:
                bucket.precondition(xs, ds, outs, self.work)
        return outs
