"""ZeRO-1 across data-parallel ranks: each rank owns some blocks, keeps and computes only theirs.

Under data parallelism every rank holds the same averaged gradients. Rather than
each rank repeating the whole step, the work is split (the paper's §4, and
ZeRO stage 1 for the whole optimizer):

* :func:`split_rows` cuts the rows of blocks of all parameters, in order, into one
  run per rank of about equal cost (:func:`block_cost`: the statistics and the
  preconditioning, ≈ 2·numel·Σnᵢ flops, the amortized roots, Σnᵢ³ / frequency, and
  the elementwise work), deterministically: a pure function of the shapes, the
  options and the world size, the same on every rank. A parameter that straddles
  a cut is split by rows of blocks (its merged axis 0) between ranks; the others
  fall wholly to one rank (``Shampoo.rows``).
* A rank keeps state only for what it owns (its blocks' statistics and roots, its
  rows of the first moment, grafting accumulator and momentum) and computes only
  its updates, roots included: the owner is the only rank that uses a root, so
  roots are never exchanged, and background roots (either mode) run per rank.
* :meth:`Sharding.share` then makes the step's one collective: an ``all_gather``
  of every rank's owned directions (P after momentum, of whole parameters or of
  rows) in one flat byte buffer; the rows of a split parameter are joined again.
  Every rank then applies ``W ← W(1 − lr·λ) − lr·P`` to every parameter.

**Directions travel, not parameters.** A direction is what the lr step consumes,
so the lr, the weight decay and a scheduler stay in every rank's param groups,
and in bf16 (``communication_dtype=torch.bfloat16``) only the update is rounded,
never the weights themselves. In the default (each direction's own dtype: fp32,
or fp64 for fp64 parameters) the bytes are sent verbatim and the run is
bit-identical to one process. In bf16 the owner applies the same rounded
direction as everyone else, so the ranks never drift apart.

**FSDP2 and HSDP** (DTensor parameters; the section below): ``fsdp="lossless"`` moves only
rows, with ``all_to_all`` (gradient rows to the owner, update rows back), never an all-gather
of everything; ``fsdp="local"`` moves nothing but a flag per parameter.

**Checkpoints.** Two ways, both loading at any world size:

* :func:`save_checkpoint` / :func:`load_checkpoint` (``torch.distributed.checkpoint``)
  keep the state sharded: each rank writes only its own state, under global keys
  (:func:`state_key`, :func:`extra_key`, ``META_KEY``); the loader checks the
  settings and shapes first, cuts the rows for its world size and reads only its
  own entries (of rows saved apart, those that overlap its own). No rank holds the
  whole state.
* ``state_dict()`` is a collective under sharding: every rank must call it, and
  each gets the whole state (every owner's entries, and every rank's pending root
  results), so ``torch.save`` of it on rank 0 is a complete checkpoint.
  ``load_state_dict`` keeps what this rank owns under the current world size.

**Failures.** A rank that dies makes the collective fail on the others: gloo and
NCCL raise when a peer's connection closes, and at the latest after the process
group's ``timeout``. The error is re-raised as :class:`ExchangeError` naming the
step; resume from the last checkpoint (see the README's multi-GPU section).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .blocks import Block, BlockPlan, row_units, rows_plan

if TYPE_CHECKING:
    from .optimizer import Shampoo

__all__ = [
    "ExchangeError", "Grid", "Sharding", "assign_owners", "extra_key", "from_owners", "grid", "load_checkpoint",
    "optimizer_shard", "param_cost", "placement_error", "row_costs", "save_checkpoint", "split_rows", "state_key",
    "to_owners",
]  # fmt: skip


class ExchangeError(RuntimeError):
    """The step's collective failed, most likely because a rank died."""


def block_cost(block: Block, frequency: int) -> float:
    """The step's work for one block: statistics and preconditioning (2·numel·Σnᵢ), the
    amortized roots (Σnᵢ³ / frequency) and the elementwise stages (numel)."""
    numel = math.prod(block.shape)
    dims = [block.shape[a] for a in block.axes]
    return 2 * numel * sum(dims) + sum(n**3 for n in dims) / frequency + numel


def param_cost(plan: BlockPlan, frequency: int) -> float:
    """The step's work for one parameter: the sum of its blocks' :func:`block_cost`."""
    return sum(block_cost(b, frequency) for b in plan.blocks)


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each item: the costliest first, to the least-loaded rank (greedy LPT).

    Ties break by item index and then by rank, so every rank computes the same
    assignment from the same list. Ranks may own nothing.
    """
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def row_costs(plan: BlockPlan, frequency: int) -> list[tuple[int, int, float]]:
    """``(lo, hi, cost)`` of each of ``plan``'s :func:`~scalable_shampoo.blocks.row_units`: the
    rows where ranks may split the parameter, with their blocks' :func:`block_cost`; one
    unit of all rows where it must stay whole."""
    units = row_units(plan)
    if len(units) < 2:
        return [(0, units[0][1] if units else 0, param_cost(plan, frequency))]
    cost = dict.fromkeys(units, 0.0)
    for b in plan.blocks:
        cost[(b.index[0].start, b.index[0].stop)] += block_cost(b, frequency)
    return [(lo, hi, c) for (lo, hi), c in cost.items()]


def split_rows(units: list[list[tuple[int, int, float]]], world_size: int) -> list[list[tuple[int, int, int]]]:
    """Who computes which rows: ``units[i]`` are parameter ``i``'s row ranges that no block
    crosses, with their cost, ``(lo, hi, cost)``; returns, per parameter, its pieces
    ``(rank, lo, hi)`` in row order.

    The units of all parameters, in order, are cut into ``world_size`` consecutive runs of
    about equal cost (a unit goes to the next rank once its middle is past this rank's
    share), so a rank's rows of a parameter are one range, and only a parameter that
    straddles a cut is split: at most ``world_size − 1`` of them. A pure function of
    its arguments, the same on every rank; ranks may own nothing.
    """
    total = sum(c for us in units for *_, c in us)
    out: list[list[tuple[int, int, int]]] = []
    done, rank = 0.0, 0
    for us in units:
        pieces: list[tuple[int, int, int]] = []
        for lo, hi, cost in us:
            while rank < world_size - 1 and done + cost / 2 > total * (rank + 1) / world_size:
                rank += 1
            done += cost
            if pieces and pieces[-1][0] == rank:
                pieces[-1] = (rank, pieces[-1][1], hi)
            else:
                pieces.append((rank, lo, hi))
        out.append(pieces)
    return out


class Sharding:
    """This rank's place in the group that shares the optimizer's work."""

    def __init__(self, group: Any, communication_dtype: torch.dtype | None = None) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        self.bytes_received = 0  # by this rank, and the seconds spent in the exchange (for the benchmark)
        self.exchange_s = self.exchange_cpu_s = 0.0

    def wire(self, d: Tensor) -> Tensor:
        """A direction as it travels (and as its owner must use it too)."""
        return d if self.communication_dtype is None else d.to(self.communication_dtype)

    def share(self, step: int, owners: list[int], shapes: list[tuple[torch.Size, torch.dtype]],
              mine: list[Tensor]) -> list[Tensor]:  # fmt: skip
        """Every item's direction, from the owners' ``mine`` (in item order): one ``all_gather``.

        ``owners`` and ``shapes`` (shape and dtype on the wire) describe every item, the
        same on every rank; ``mine`` are this rank's items' directions, already :meth:`wire`d.
        """
        nbytes = [torch.Size(s).numel() * dt.itemsize for s, dt in shapes]
        sizes = [sum(b for b, o in zip(nbytes, owners) if o == r) for r in range(self.world)]
        parts = [d.contiguous().view(-1).view(torch.uint8) for d in mine]
        device = mine[0].device if mine else torch.device("cpu")
        send = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
        if parts:
            torch.cat(parts, out=send[: sizes[self.rank]])
        recv = [torch.empty_like(send) for _ in range(self.world)]
        start, cpu = time.perf_counter(), time.process_time()
        try:
            dist.all_gather(recv, send, group=self.group)
        except Exception as e:  # a dead peer: connection closed, or the group's timeout
            raise ExchangeError(f"sharing updates at step {step} failed on rank {self.rank}: {e}") from e
        self.exchange_s += time.perf_counter() - start
        self.exchange_cpu_s += time.process_time() - cpu
        self.bytes_received += (self.world - 1) * send.numel()
        out, cursor, own = [], [0] * self.world, iter(mine)
        for (shape, dtype), n, o in zip(shapes, nbytes, owners):
            if o == self.rank:
                out.append(next(own))
            else:
                out.append(recv[o][cursor[o] : cursor[o] + n].clone().view(dtype).view(shape))  # aligned copy
            cursor[o] += n
        return out

    def all_to_all(self, step: int, send: list[list[Tensor]], recv_bytes: list[int]) -> list[Tensor]:
        """One ``all_to_all_single`` of bytes: ``send[r]`` (tensors, in order) goes to rank ``r``;
        returns, per source rank, the ``recv_bytes[r]`` bytes it sent here (uint8, this rank's own empty)."""
        parts = [[t.contiguous().view(-1).view(torch.uint8) for t in ts] for ts in send]
        split_in = [sum(t.numel() for t in ts) for ts in parts]
        device = next((t.device for ts in parts for t in ts), torch.device("cpu"))
        flat = [t for ts in parts for t in ts]
        buf = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=device)
        out = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=device)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            dist.all_to_all_single(out, buf, output_split_sizes=list(recv_bytes), input_split_sizes=split_in,
                                   group=self.group)  # fmt: skip
        except Exception as e:  # a dead peer: connection closed, or the group's timeout
            raise ExchangeError(f"exchanging shards at step {step} failed on rank {self.rank}: {e}") from e
        self.exchange_s += time.perf_counter() - start
        self.exchange_cpu_s += time.process_time() - cpu
        self.bytes_received += sum(recv_bytes)
        return list(out.split(list(recv_bytes)))

    def all_true(self, step: int, flags: Tensor) -> Tensor:
        """``flags`` (one per item, 0 or 1) and-ed over the group: the same answer on every rank."""
        out = flags.to(torch.float32)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
        except Exception as e:
            raise ExchangeError(f"checking the gradients at step {step} failed on rank {self.rank}: {e}") from e
        self.exchange_s += time.perf_counter() - start
        self.exchange_cpu_s += time.process_time() - cpu
        self.bytes_received += (self.world - 1) * out.numel() * 4  # as if each rank's flags came to every rank
        return out > 0

    def __getstate__(self) -> dict[str, Any]:
        """A copy (deepcopy, pickle) shares the work in the default group, as its original did."""
        if self.group not in (None, dist.group.WORLD):
            raise RuntimeError("an optimizer sharded over a process group other than the default can't be copied")
        return {"communication_dtype": self.communication_dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a copy of a sharded optimizer needs torch.distributed initialised, as its original")
        self.__init__(dist.group.WORLD, state["communication_dtype"])  # type: ignore[misc]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


# ---------------------------------------------------------------------------- FSDP2 and HSDP
# A DTensor parameter (``fully_shard``) is split by rows (``Shard(0)``) over one mesh dim, and
# copied over another (``Replicate()``: HSDP's replica groups). Its rows live on a grid of ranks:
# ``ranks[r][s]`` holds rows ``rows[s]`` in replica ``r``. ``Shampoo(fsdp=...)`` chooses:
#
# * ``"lossless"``: the owner of a parameter, or of some rows of blocks of it (any rank of the
#   grid; :func:`split_rows` over the whole group, as for plain parameters) receives the rows
#   it lacks from their holders in its own replica (:func:`to_owners`), computes their update
#   as one process would, and sends each holder its rows of it (:func:`from_owners`): two
#   ``all_to_all`` per step.
# * ``"local"``: every rank preconditions the blocks of its own rows (no exchange); under
#   HSDP each replica group splits that work ZeRO-1 style (:meth:`Sharding.share` in the
#   mesh's replicate group).


class Grid(NamedTuple):
    """Where the rows of one DTensor parameter live: ``ranks[r][s]`` (ranks of the optimizer's
    group) holds rows ``rows[s][0] … rows[s][1] − 1`` in replica ``r``."""

    ranks: tuple[tuple[int, ...], ...]
    rows: tuple[tuple[int, int], ...]
    replicate_dim: int | None  # the mesh dim of the replicas (HSDP), if any

    def where(self, rank: int) -> tuple[int, int]:
        """(replica, shard) of ``rank``."""
        for r, line in enumerate(self.ranks):
            if rank in line:
                return r, line.index(rank)
        raise ValueError(f"rank {rank} holds no rows of this parameter")


SUPPORTED_PLACEMENTS = "FSDP2 and HSDP placements: Shard(0) on one mesh dim, Replicate() on at most one other"


def placement_error(p: Tensor) -> str | None:
    """Why Shampoo can't step the DTensor ``p`` (tensor parallel, ``Partial``, …); None if it can."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)  # type: ignore[attr-defined]
    shards = [pl for pl in placements if type(pl) is Shard and pl.dim == 0]
    replicas = [pl for pl in placements if type(pl) is Replicate]
    if len(shards) + len(replicas) == len(placements) and len(shards) <= 1 and len(replicas) <= 1:
        return None
    return f"placements {placements} on a mesh of shape {tuple(p.device_mesh.shape)}"  # type: ignore[attr-defined]


def grid(p: Tensor, group: Any) -> Grid:
    """The :class:`Grid` of the DTensor ``p`` (its placements checked by :func:`placement_error`),
    in ranks of ``group``, which must hold every rank of ``p``'s mesh."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)  # type: ignore[attr-defined]
    ranks = mesh.mesh
    shard_dim = next((d for d, pl in enumerate(placements) if type(pl) is Shard), None)
    replicate_dim = next((d for d, pl in enumerate(placements) if type(pl) is not Shard), None)
    table = ranks.movedim(shard_dim, -1).reshape(-1, ranks.shape[shard_dim]) if shard_dim is not None \
        else ranks.reshape(-1, 1)  # fmt: skip
    world = dist.get_world_size(group)
    try:
        in_group = [[dist.get_group_rank(group, int(g)) for g in line] for line in table.tolist()]
    except (ValueError, RuntimeError):
        in_group = []
    if not in_group or sorted(r for line in in_group for r in line) != list(range(world)):
        raise ValueError(
            f"a DTensor parameter's mesh (ranks {ranks.flatten().tolist()}) must be the whole process_group "
            f"({world} ranks) that Shampoo shares its work in"
        )
    n, shards = p.shape[0], table.shape[1]
    chunk = -(-n // shards)  # torch.chunk's: the last shards may be short or empty
    rows = tuple((min(s * chunk, n), min((s + 1) * chunk, n)) for s in range(shards))
    return Grid(tuple(tuple(line) for line in in_group), rows, replicate_dim)


Piece = tuple[int, int, int]  # (rank, lo, hi): rows lo … hi-1 of a parameter, computed by rank (Shampoo.rows)


def _row_bytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape[1:]) * dtype.itemsize


def to_owners(sh: Sharding, step: int, grids: list[Grid], pieces: list[Piece], shapes: list[torch.Size],
              shards: list[Tensor]) -> list[Tensor | None]:  # fmt: skip
    """Rows ``lo … hi-1`` of the whole gradient of each piece ``(owner, lo, hi)`` this rank owns
    (None for the others): one ``all_to_all``.

    ``grids``, ``pieces`` and ``shapes`` (the whole gradient's) describe every piece, the same on
    every rank; ``shards`` are this rank's rows of the piece's parameter (one dtype per piece on
    every rank). The owner takes the rows it lacks from their holders in its own replica; rows are
    only copied, so the gradient is bitwise the one a single process sees."""
    me = sh.rank
    send: list[list[Tensor]] = [[] for _ in range(sh.world)]
    recv = [0] * sh.world
    for g, (o, lo, hi), shape, mine in zip(grids, pieces, shapes, shards):
        replica = g.where(o)[0]
        for s, (a, b) in enumerate(g.rows):
            src, start, stop = g.ranks[replica][s], max(a, lo), min(b, hi)
            if src != o and stop > start:
                if src == me:
                    send[o].append(mine[start - a : stop - a])
                if o == me:
                    recv[src] += (stop - start) * _row_bytes(shape, mine.dtype)
    got = sh.all_to_all(step, send, recv)
    cursor = [0] * sh.world
    out: list[Tensor | None] = []
    for g, (o, lo, hi), shape, mine in zip(grids, pieces, shapes, shards):
        if o != me:
            out.append(None)
            continue
        replica, parts = g.where(o)[0], []
        for s, (a, b) in enumerate(g.rows):
            src, start, stop = g.ranks[replica][s], max(a, lo), min(b, hi)
            if stop <= start:
                continue
            if src == me:
                parts.append(mine[start - a : stop - a])
            else:
                n = (stop - start) * _row_bytes(shape, mine.dtype)
                parts.append(got[src][cursor[src] : cursor[src] + n].clone().view(mine.dtype)
                             .view(stop - start, *shape[1:]))  # fmt: skip
                cursor[src] += n
        out.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
    return out


def from_owners(sh: Sharding, step: int, grids: list[Grid], pieces: list[Piece], shapes: list[torch.Size],
                dtypes: list[torch.dtype], mine: list[Tensor | None]) -> list[Tensor | None]:  # fmt: skip
    """This rank's rows of each piece's update (None where it holds none of them), from ``mine``:
    the updates of the pieces ``(owner, lo, hi)`` this rank owns (rows ``lo … hi-1`` of the whole,
    already on the wire's dtype; None for the others): one ``all_to_all``."""
    me = sh.rank
    send: list[list[Tensor]] = [[] for _ in range(sh.world)]
    recv = [0] * sh.world
    for g, (o, lo, hi), shape, dtype, d in zip(grids, pieces, shapes, dtypes, mine):
        for line in g.ranks:
            for dst, (a, b) in zip(line, g.rows):
                start, stop = max(a, lo), min(b, hi)
                if dst == o or stop <= start:
                    continue
                if o == me:
                    assert d is not None
                    send[dst].append(d[start - lo : stop - lo])
                if dst == me:
                    recv[o] += (stop - start) * _row_bytes(shape, dtype)
    got = sh.all_to_all(step, send, recv)
    cursor = [0] * sh.world
    out: list[Tensor | None] = []
    for g, (o, lo, hi), shape, dtype, d in zip(grids, pieces, shapes, dtypes, mine):
        a, b = g.rows[g.where(me)[1]]
        start, stop = max(a, lo), min(b, hi)
        if stop <= start:
            out.append(None)
        elif o == me:
            assert d is not None
            out.append(d[start - lo : stop - lo])
        else:
            n = (stop - start) * _row_bytes(shape, dtype)
            out.append(got[o][cursor[o] : cursor[o] + n].clone().view(dtype).view(stop - start, *shape[1:]))
            cursor[o] += n
    return out


def merge_pending(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One scheduler state holding every rank's pending results (entries of one submit step merged)."""
    merged: dict[tuple[int, int], list[Any]] = {}
    for state in states:
        for item in state.get("pending", []):
            merged.setdefault((item["submit_step"], item["apply_step"]), []).extend(item["outcomes"])
    pending = [dict(submit_step=s, apply_step=a, outcomes=outs) for (s, a), outs in sorted(merged.items())]
    return {**states[0], "pending": pending}


def filter_pending(state: dict[str, Any], owns: Callable[[int, int], bool]) -> dict[str, Any]:
    """The pending results of the blocks that ``owns(param_index, block)``."""
    pending = []
    for item in state.get("pending", []):
        outs = [o for o in item["outcomes"] if owns(int(o["key"][0]), int(o["key"][1]))]
        if outs:
            pending.append({**item, "outcomes": outs})
    return {**state, "pending": pending}


# Keys of the optimizer's entries in a checkpoint of save_checkpoint: global (the parameter's
# index in param_groups order, then the state key of state.py), the same at any world size.
# Entries that belong to a part of a parameter carry the part before the key: FSDP2 "local"
# state is per shard, under "shard{s}" (s: the shard's place in the mesh's shard dim); where
# ranks split a plain parameter by rows (Shampoo.rows), each rank's rows of its elementwise
# buffers and its extra entry are under "rows{lo}-{hi}" (its blocks' entries and the step,
# written by the first rows' rank, keep the global keys).
META_KEY = "optimizer.meta"


def state_key(index: int, key: str, part: str | None = None) -> str:  # one tensor of parameter ``index``'s state
    return f"optimizer.state.{index}.{key}" if part is None else f"optimizer.state.{index}.{part}.{key}"


def extra_key(index: int, part: str | None = None) -> str:  # its other entries (root methods) and pending roots
    return f"optimizer.extra.{index}" if part is None else f"optimizer.extra.{index}.{part}"


def _parse(fqn: str) -> tuple[str, int, str | None, str] | None:
    """(``"state"`` or ``"extra"``, parameter index, part or None, state key or "") of an
    optimizer entry's key; None for any other key."""
    parts = fqn.split(".", 3)
    if len(parts) < 3 or parts[0] != "optimizer" or parts[1] not in ("state", "extra"):
        return None
    rest = parts[3] if len(parts) > 3 else ""
    head, _, tail = rest.partition(".")
    if head.startswith(("shard", "rows")) and (head[4:5].isdigit() or head[5:6].isdigit()):
        return parts[1], int(parts[2]), head, tail
    return parts[1], int(parts[2]), None, rest


def _rows_of(part: str) -> tuple[int, int]:
    lo, hi = part[len("rows") :].split("-")
    return int(lo), int(hi)


def _local_meshes(optimizer: Shampoo) -> list[list[int] | None]:
    """Per parameter, the shape of its mesh where its state is of this rank's shard (FSDP2
    ``"local"``), else None: such state loads only on the same mesh, into ``"local"``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [list(p.device_mesh.shape) if optimizer._is_local(p) else None for p in params]


def _part_of(optimizer: Shampoo, index: int, p: Tensor) -> str | None:
    """The part of parameter ``index`` whose state this rank keeps: ``"shard{s}"`` where its state
    is per shard (``"local"``), ``"rows{lo}-{hi}"`` where ranks split it by rows, else None."""
    if optimizer._is_local(p):
        if optimizer._sharding is None:  # a mesh of one rank: its one shard is the whole parameter
            return "shard0"
        return f"shard{optimizer._grids[p].where(optimizer._sharding.rank)[1]}"
    rank = optimizer._sharding.rank if optimizer._sharding is not None else 0
    pieces = optimizer.rows()[index]
    mine = [(lo, hi) for r, lo, hi in pieces if r == rank]
    return f"rows{mine[0][0]}-{mine[0][1]}" if len(pieces) > 1 and mine else None


def _check_local(meta: dict[str, Any], optimizer: Shampoo) -> None:
    """A ``ValueError`` naming what differs where per-shard (``"local"``) state would load into
    another mesh or another mode; nothing is loaded. Checkpoints without the entry hold none."""
    saved, now = meta.get("local_meshes") or [None] * len(meta["shapes"]), _local_meshes(optimizer)
    for i, (s, n) in enumerate(zip(saved, now)):
        if s == n:
            continue
        if s is None or n is None:
            what = (f"fsdp='local' state of mesh shape {tuple(s)}" if s is not None else
                    f"state of the whole parameter (fsdp={meta.get('fsdp', 'lossless')!r} or not sharded)")
            here = (f"fsdp='local' on mesh shape {tuple(n)}" if n is not None else
                    f"fsdp={optimizer.fsdp!r} (state of the whole parameter)")
            raise ValueError(f"parameter {i}: the checkpoint holds {what}, here it is {here}; "
                             "build the optimizer with the checkpoint's fsdp mode; nothing was loaded")
        raise ValueError(f"parameter {i}: the checkpoint holds fsdp='local' state of mesh shape {tuple(s)} (world size "
                         f"{meta['world_size']}), here the mesh shape is {tuple(n)} (world size "
                         f"{optimizer._sharding.world if optimizer._sharding is not None else 1}): per-shard state "
                         "loads only on the same mesh; nothing was loaded")  # fmt: skip


def _packed(obj: Any) -> io.BytesIO:
    """An object as DCP stores it byte for byte, to be read back with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unpacked(buf: io.BytesIO) -> Any:
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _pending_by_param(scheduler: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """A scheduler state's pending results, split by parameter index (the inverse of :func:`merge_pending`)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for item in scheduler.get("pending", []):
        per: dict[int, list[Any]] = {}
        for o in item["outcomes"]:
            per.setdefault(int(o["key"][0]), []).append(o)
        for i, outs in per.items():
            out.setdefault(i, []).append({**item, "outcomes": outs})
    return out


def optimizer_shard(optimizer: Shampoo) -> dict[str, Any]:
    """This rank's entries of a sharded checkpoint (no communication): the state of what it
    owns, each tensor under :func:`state_key`, its other entries and pending root results
    under :func:`extra_key`, and the settings, step counters and shapes under ``META_KEY``
    (the same on every rank). Without sharding every rank holds every entry (DCP writes it once)."""
    from .state import ELEMENTWISE, FORMAT_VERSION

    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharding = optimizer._sharding
    layout, rank = optimizer.rows(), sharding.rank if sharding is not None else 0
    scheduler = optimizer.scheduler.state_dict()  # this rank's pending results: its own blocks' roots
    pending = _pending_by_param(scheduler)
    out: dict[str, Any] = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p)
        if not state and i not in pending:
            continue
        if not any(r == rank for r, *_ in layout[i]):  # each entry must have one writer, or DCP would keep
            raise RuntimeError(f"rank {rank} holds optimizer state of parameter {i}, which rank "
                               f"{layout[i][0][0]} owns")  # an arbitrary rank's  # fmt: skip
        part = _part_of(optimizer, i, p)  # "local": one writer per shard (its owner among the replicas)
        rows = part is not None and part.startswith("rows")
        for k, v in (state or {}).items():
            if not torch.is_tensor(v):
                continue
            if rows and k not in ELEMENTWISE:  # a block's entry, or the step (written by the first rows' rank)
                if k != "step" or part.startswith("rows0-"):  # type: ignore[union-attr]
                    out[state_key(i, k)] = v.detach()
            else:
                out[state_key(i, k, part)] = v.detach()
        objects = {k: v for k, v in (state or {}).items() if not torch.is_tensor(v)}
        out[extra_key(i, part)] = _packed({"objects": objects, "pending": pending.get(i, [])})
    start, groups = 0, []
    for g in optimizer.param_groups:  # as torch.optim packs them: each parameter as its index
        indices = list(range(start, start + len(g["params"])))
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": indices})
        start += len(indices)
    meshes = _local_meshes(optimizer)  # "local" parameters: per-shard owners differ by rank, recorded as -1
    meta = dict(format_version=FORMAT_VERSION, global_step=optimizer.global_step, skipped_steps=optimizer.skipped_steps,
                param_groups=groups, shapes=[list(p.shape) for p in params],
                owners=[ps[0][0] if m is None else -1 for ps, m in zip(layout, meshes)],
                rows=[[list(x) for x in ps] if m is None else None for ps, m in zip(layout, meshes)],
                world_size=sharding.world if sharding is not None else 1, fsdp=optimizer.fsdp, local_meshes=meshes,
                scheduler={k: v for k, v in scheduler.items() if k != "pending"})  # fmt: skip
    out[META_KEY] = _packed(meta)
    return out


def _require_shampoo(optimizer: Any) -> None:
    from .optimizer import Shampoo

    if not isinstance(optimizer, Shampoo):
        raise ValueError(f"optimizer must be a scalable_shampoo.Shampoo, got {type(optimizer).__name__}")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: Shampoo,
                    *, storage_writer: Any = None) -> None:  # fmt: skip
    """Save with ``torch.distributed.checkpoint`` (DCP), on every rank: the model as DCP shards
    (FSDP2 or DDP), and of the optimizer each rank writes only what it owns
    (:func:`optimizer_shard`), so no rank ever holds the whole optimizer state.
    :func:`load_checkpoint` reads it at any world size, except FSDP2 ``fsdp="local"`` state,
    which is of each rank's shards (written per shard, by the rank that owns its work) and
    loads only on the same mesh shape, in ``"local"`` mode. ``storage_writer``: DCP's, if
    not a file system folder."""
    import torch.distributed.checkpoint as dcp  # here, so that importing the library does not load it
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _require_shampoo(optimizer)
    state = {"model": get_model_state_dict(model), **optimizer_shard(optimizer)}
    dcp.save(state, checkpoint_id=path, storage_writer=storage_writer)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: Shampoo,
                    *, storage_reader: Any = None) -> None:  # fmt: skip
    """Load what :func:`save_checkpoint` wrote, at this world size, on every rank.

    The optimizer's settings are checked first (:func:`~scalable_shampoo.state.check_groups`:
    another model or settings that lay out the state otherwise raise a ``ValueError``, and
    neither the model nor the optimizer changes), and so is per-shard state (FSDP2
    ``fsdp="local"``): loaded on another mesh shape (or world size), into another mode, or
    a checkpoint of whole parameters' state into ``"local"``, it is a ``ValueError`` naming
    the saved and the present mesh or mode. Owners are then assigned for this world
    size, and each rank reads the model and only its own parameters' optimizer state and
    pending roots. A checkpoint of the earlier layout (the whole optimizer state as one
    object) loads too. ``storage_reader``: DCP's, if not a file system folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from .state import TOP_KEY, block_of, check_format, check_groups

    _require_shampoo(optimizer)
    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(path)
    stored = reader.read_metadata().state_dict_metadata
    if META_KEY not in stored and "optimizer" not in stored:
        raise ValueError(f"the checkpoint at {str(path)!r} holds no optimizer state: it was not written by "
                         "scalable_shampoo.distributed.save_checkpoint")  # fmt: skip
    if META_KEY not in stored:  # the earlier layout: the whole optimizer state_dict as one object
        whole: dict[str, Any] = {"optimizer": io.BytesIO()}
        dcp.load(whole, checkpoint_id=path, storage_reader=reader)
        optimizer.load_state_dict(_unpacked(whole["optimizer"]))  # checked before the model changes
        model_state = {"model": get_model_state_dict(model)}
        dcp.load(model_state, checkpoint_id=path, storage_reader=reader)  # in place, into the model's tensors
        set_model_state_dict(model, model_state["model"])
        return
    head: dict[str, Any] = {META_KEY: io.BytesIO()}
    dcp.load(head, checkpoint_id=path, storage_reader=reader)
    meta = _unpacked(head[META_KEY])
    check_format(meta)
    groups = check_groups(optimizer, meta["param_groups"], meta["shapes"])
    _check_local(meta, optimizer)
    layout = optimizer._rows_under(groups)
    sharding = getattr(optimizer, "_sharding", None)
    rank = sharding.rank if sharding is not None else 0
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    mine = {i: (lo, hi) for i, ps in enumerate(layout) for r, lo, hi in ps if r == rank}  # this rank's rows
    split = {i for i in mine if len(layout[i]) > 1}  # ...of which it computes some rows only
    blocks = {i: rows_plan(optimizer._shard_plan(*params[i]), *mine[i]) for i in split}
    shards = {i: _part_of(optimizer, i, params[i][0]) if optimizer._is_local(params[i][0]) else None for i in mine}

    def wanted_entry(kind: str, i: int, part: str | None, key: str) -> bool:
        if i not in mine:
            return False
        if shards[i] is not None:  # "local": this rank's shard's entries only
            return part == shards[i]
        if part is not None:  # rows saved apart: those that overlap this rank's
            (lo, hi), (start, stop) = mine[i], _rows_of(part)
            return i not in split or (start < hi and lo < stop)
        b = block_of(key) if kind == "state" else None
        return b is None or i not in split or blocks[i].first <= b < blocks[i].first + len(blocks[i].blocks)

    wanted: dict[str, Any] = {}
    for fqn, md in stored.items():
        parsed = _parse(fqn)
        if parsed is not None and wanted_entry(*parsed):
            if isinstance(md, TensorStorageMetadata):
                wanted[fqn] = torch.empty(md.size, dtype=md.properties.dtype)  # DCP reads into it
            else:
                wanted[fqn] = io.BytesIO()
    state = {"model": get_model_state_dict(model), **wanted}
    dcp.load(state, checkpoint_id=path, storage_reader=reader)
    per_param: dict[int, dict[str, Any]] = {}
    saved_rows: dict[tuple[int, str], list[tuple[int, Tensor]]] = {}
    pending = [{**meta["scheduler"], "pending": []}]
    for fqn, value in state.items():
        parsed = _parse(fqn)
        if parsed is None:
            continue
        kind, i, part, key = parsed
        if kind == "extra":
            extra = _unpacked(value)
            per_param.setdefault(i, {}).update(extra["objects"])
            pending.append({"pending": extra["pending"]})
        elif part is not None and part.startswith("rows"):
            saved_rows.setdefault((i, key), []).append((_rows_of(part)[0], value))
        else:
            per_param.setdefault(i, {})[key] = value
    for (i, key), got in saved_rows.items():  # joined, then cut to this rank's rows
        got.sort(key=lambda x: x[0])
        joined = torch.cat([t for _, t in got])
        if i in split:
            lo, hi = mine[i]
            per_param[i][key] = joined[lo - got[0][0] : hi - got[0][0]]
        else:
            per_param[i][key] = joined.view(params[i][0].shape)
    sd = {
        "state": {i: st for i, st in per_param.items() if st},
        "param_groups": meta["param_groups"],
        TOP_KEY: {k: meta[k] for k in ("format_version", "global_step", "skipped_steps")}
        | {"scheduler": merge_pending(pending)},
    }
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(sd)
