"""ZeRO-1 across data-parallel ranks: each rank owns some parameters, keeps and computes only theirs.

Under data parallelism every rank holds the same averaged gradients. Rather than
each rank repeating the whole step, the work is split (the paper's §4, and
ZeRO stage 1 for the whole optimizer):

* :func:`assign_owners` gives each parameter to one rank, deterministically (a
  pure function of the shapes, the options and the world size, the same on every
  rank), balancing the step's cost: per block, the statistics and the
  preconditioning (≈ 2·numel·Σnᵢ flops), the amortized roots (Σnᵢ³ / frequency)
  and the elementwise work. All blocks of a parameter go to its owner.
* A rank keeps state only for the parameters it owns (statistics, roots, first
  moment, grafting accumulator, momentum) and computes only their updates,
  roots included: the owner is the only rank that uses a root, so roots are never
  exchanged, and background roots (either mode) run per rank.
* :meth:`Sharding.share` then makes the step's one collective: an ``all_gather``
  of every rank's owned directions (P after momentum) in one flat byte buffer.
  Every rank then applies ``W ← W(1 − lr·λ) − lr·P`` to every parameter.

**Directions travel, not parameters.** A direction is what the lr step consumes,
so the lr, the weight decay and a scheduler stay in every rank's param groups,
and in bf16 (``communication_dtype=torch.bfloat16``) only the update is rounded,
never the weights themselves. In the default (each direction's own dtype: fp32,
or fp64 for fp64 parameters) the bytes are sent verbatim and the run is
bit-identical to one process. In bf16 the owner applies the same rounded
direction as everyone else, so the ranks never drift apart.

**Checkpoints.** ``state_dict()`` is a collective under sharding: every rank
must call it, and each gets the whole state (every owner's entries, and every
rank's pending root results). ``load_state_dict`` keeps what this rank owns under
the current world size, so a checkpoint loads at any world size.

**Failures.** A rank that dies makes the collective fail on the others: gloo and
NCCL raise when a peer's connection closes, and at the latest after the process
group's ``timeout``. The error is re-raised as :class:`ExchangeError` naming the
step; resume from the last checkpoint (see the README's multi-GPU section).
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .blocks import BlockPlan

__all__ = ["ExchangeError", "Sharding", "assign_owners", "load_checkpoint", "param_cost", "save_checkpoint"]


class ExchangeError(RuntimeError):
    """The step's collective failed, most likely because a rank died."""


def param_cost(plan: BlockPlan, frequency: int) -> float:
    """The step's work for one parameter: statistics and preconditioning (2·numel·Σnᵢ per
    block), amortized roots (Σnᵢ³ / frequency) and the elementwise stages (numel)."""
    cost = 0.0
    for block in plan.blocks:
        numel = 1
        for n in block.shape:
            numel *= n
        dims = [block.shape[a] for a in block.axes]
        cost += 2 * numel * sum(dims) + sum(n**3 for n in dims) / frequency + numel
    return cost


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


def merge_pending(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One scheduler state holding every rank's pending results (entries of one submit step merged)."""
    merged: dict[tuple[int, int], list[Any]] = {}
    for state in states:
        for item in state.get("pending", []):
            merged.setdefault((item["submit_step"], item["apply_step"]), []).extend(item["outcomes"])
    pending = [dict(submit_step=s, apply_step=a, outcomes=outs) for (s, a), outs in sorted(merged.items())]
    return {**states[0], "pending": pending}


def filter_pending(state: dict[str, Any], owned: set[int]) -> dict[str, Any]:
    """The pending results of the parameters (by index) in ``owned``."""
    pending = []
    for item in state.get("pending", []):
        outs = [o for o in item["outcomes"] if int(o["key"][0]) in owned]
        if outs:
            pending.append({**item, "outcomes": outs})
    return {**state, "pending": pending}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save with ``torch.distributed.checkpoint``: the model as DCP shards (FSDP2 or
    DDP), the optimizer's whole state (gathered from its owners) as one object. Call
    on every rank; a checkpoint saved at one world size loads at any other."""
    import torch.distributed.checkpoint as dcp  # here, so that importing the library does not load it
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    buf.seek(0)
    dcp.save({"model": get_model_state_dict(model), "optimizer": buf}, checkpoint_id=path)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_checkpoint` wrote, resharding the model to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model), "optimizer": io.BytesIO()}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    state["optimizer"].seek(0)
    optimizer.load_state_dict(torch.load(state["optimizer"], weights_only=True))
