"""Split root work across data-parallel ranks (paper §4).

Under data parallelism the gradients are already averaged, so every rank holds
the same statistics and takes the same step. Only the roots are split:

* :func:`assign_owners` gives each root job to one rank, deterministically,
  balancing the cost of a root (~n³ for an n×n statistic), not its bytes.
* :class:`DistributedRoots` wraps a scheduler: each rank computes the jobs it
  owns (inline, or in the background) and, at the step where the results
  apply, one ``all_gather`` shares every rank's roots with every other.

**What is sent.** Roots, not preconditioned directions: a root is sent once per
recomputation (every ``precondition_frequency`` steps) and then used for every
step until the next one, while directions would have to be exchanged every
step. Per recomputation each rank receives every root it does not own: at most
Σ n² floats over all statistics (``scalable_shampoo_bench/distributed_time.py`` reports the
bytes against the parameter count). The bytes are gathered verbatim
(``all_gather`` of a byte buffer, no arithmetic), so every rank installs roots
bit-identical to those the owner computed, and the run is bit-identical to a
single process.

**Timeouts.** A rank that dies makes the collective fail on the others: gloo and
NCCL raise when a peer's connection closes, and at the latest after the process
group's ``timeout`` (``init_process_group(timeout=...)``). The error is re-raised
as :class:`RootExchangeError` naming the step; resume from the last checkpoint
(see the README's multi-GPU section).
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .background import InlineRoots, Key, RootJob, RootOptions, RootOutcome, RootScheduler
from .matrix_roots import RootMethod, fallback_chain

__all__ = ["DistributedRoots", "RootExchangeError", "assign_owners", "load_checkpoint", "save_checkpoint"]

_META = 4  # float64 per job: residual, ε_eff, λ_max, fallback stage (-1: rejected)


class RootExchangeError(RuntimeError):
    """The collective that shares roots failed, most likely because a rank died."""


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each job: longest first, to the least-loaded rank (cost n³).

    Ties break by job index and then by rank, so every rank computes the same
    assignment from the same list. Ranks may own nothing.
    """
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i] ** 3
    return owners


@dataclass
class _Due:
    """What every rank knows of a job whose result is due: enough to decode it."""

    key: Key
    step: int
    n: int
    dtype: torch.dtype
    options: RootOptions
    owner: int

    @property
    def root_bytes(self) -> int:
        return self.n * self.n * self.dtype.itemsize

    def stage_names(self, device: torch.device) -> list[str]:
        o = self.options
        return [c[0] for c in fallback_chain(o.method.resolve(device), o.dtype, o.eps, o.retries)]


class DistributedRoots:
    """Each rank computes the roots it owns; one ``all_gather`` per recomputation shares them.

    ``inner`` runs this rank's share: :class:`InlineRoots` (default) or a
    deterministic ``BackgroundRoots``. Latency mode can't be used: ranks would
    install results at different steps and drift apart.
    """

    def __init__(self, inner: RootScheduler | None = None, group: Any = None) -> None:
        self.inner: RootScheduler = inner if inner is not None else InlineRoots()
        if getattr(self.inner, "mode", "deterministic") != "deterministic":
            raise ValueError(f"DistributedRoots needs a deterministic scheduler, got mode={self.inner.mode!r}")  # type: ignore[attr-defined]
        self.group = group
        self.delay = int(getattr(self.inner, "delay", 0))
        self._due: dict[int, list[_Due]] = {}  # apply step → every rank's jobs
        self.bytes_received = 0  # bytes this rank received, for the benchmark
        self.device = torch.device("cpu")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        world, rank = self.world_size, dist.get_rank(self.group)
        owners = assign_owners([j.matrix.shape[-1] for j in jobs], world)
        if jobs:
            # every rank knows every job; only the owner computes it
            self._due[step + self.delay] = [
                _Due(j.key, j.step, j.matrix.shape[-1], j.matrix.dtype, j.options, o) for j, o in zip(jobs, owners)
            ]
        if jobs:
            self.device = jobs[0].matrix.device  # where the statistics live: the buffers go there
        mine = self.inner.run(step, [j for j, o in zip(jobs, owners) if o == rank])
        due = self._due.pop(step, None)
        if due is None:
            assert not mine, "a result arrived at a step where none was due"
            return []
        return self._exchange(step, due, {o.key: o for o in mine}, world, rank)

    def _exchange(
        self, step: int, due: list[_Due], mine: dict[Key, RootOutcome], world: int, rank: int
    ) -> list[RootOutcome]:
        record = [d.root_bytes + _META * 8 for d in due]
        sizes = [sum(b for d, b in zip(due, record) if d.owner == r) for r in range(world)]
        device = self.device
        send = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
        offset = 0
        for d in (d for d in due if d.owner == rank):
            out = mine[d.key]
            stage = float(d.stage_names(device).index(out.method)) if out.ok else -1.0
            meta = torch.tensor([out.residual, out.eps, out.lambda_max, stage], dtype=torch.float64)
            for part in (out.root.to(device=device, dtype=d.dtype), meta.to(device)):
                raw = part.contiguous().view(torch.uint8).flatten()
                send[offset : offset + raw.numel()] = raw
                offset += raw.numel()
        recv = [torch.empty_like(send) for _ in range(world)]
        try:
            dist.all_gather(recv, send, group=self.group)
        except Exception as e:  # a dead peer: connection closed, or the group's timeout
            raise RootExchangeError(f"sharing roots at step {step} failed on rank {rank}: {e}") from e
        self.bytes_received += (world - 1) * send.numel()
        outcomes = []
        cursor = [0] * world
        for d in due:
            buf, start, n = recv[d.owner], cursor[d.owner], d.root_bytes
            cursor[d.owner] += n + _META * 8
            root = buf[start : start + n].clone().view(d.dtype).view(d.n, d.n)
            meta = buf[start + n : start + n + _META * 8].cpu().clone().view(torch.float64)
            residual, eps, lam, stage = meta.tolist()
            ok = stage >= 0
            method = d.stage_names(device)[int(stage)] if ok else "rejected"
            outcomes.append(RootOutcome(d.key, d.step, root, residual, eps, lam, ok, method))
        return outcomes

    def state_dict(self) -> dict[str, Any]:
        """The inner scheduler's state, plus the jobs every rank still expects (inline: none)."""
        due = [
            {**asdict(d), "key": list(d.key), "options": {**asdict(d.options), "method": d.options.method.value},
             "apply": apply}
            for apply, records in self._due.items() for d in records
        ]  # fmt: skip
        return {**self.inner.state_dict(), "distributed_due": due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "distributed_due"})
        self._due = {}
        for r in state.get("distributed_due", []):
            options = RootOptions(**{**r["options"], "method": RootMethod(r["options"]["method"])})
            d = _Due(tuple(r["key"]), r["step"], r["n"], r["dtype"], options, r["owner"])
            self._due.setdefault(r["apply"], []).append(d)

    def close(self) -> None:
        self.inner.close()


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save with ``torch.distributed.checkpoint``: the model as DCP shards (FSDP2 or
    DDP), the optimizer's state, identical on every rank, as one object. Call on
    every rank; a checkpoint saved at one world size loads at any other."""
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    buf.seek(0)
    dcp.save({"model": get_model_state_dict(model), "optimizer": buf}, checkpoint_id=path)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_checkpoint` wrote, resharding the model to this world size."""
    state: dict[str, Any] = {"model": get_model_state_dict(model), "optimizer": io.BytesIO()}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    state["optimizer"].seek(0)
    optimizer.load_state_dict(torch.load(state["optimizer"], weights_only=True))
