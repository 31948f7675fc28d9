"""Root jobs and the scheduler that decides where they run and when results apply.

The optimizer hands the scheduler the jobs that are due at a step and installs
whatever the scheduler returns. ``InlineRoots`` computes them at once; the
background schedulers compute the same jobs elsewhere and return the same
results at a later step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .matrix_roots import RootMethod, inverse_root

__all__ = ["InlineRoots", "RootJob", "RootOptions", "RootOutcome", "RootScheduler", "compute_roots"]

Key = tuple[int, int, int]  # (parameter index in param_groups order, block, axis)


@dataclass(frozen=True)
class RootOptions:
    method: RootMethod
    eps: float
    relative_eps: bool
    dtype: torch.dtype
    max_residual: float
    retries: int
    newton_max_iters: int
    newton_tol: float


@dataclass
class RootJob:
    key: Key
    step: int  # the parameter's step at which the statistic was taken
    matrix: Tensor
    p: int
    options: RootOptions


@dataclass
class RootOutcome:
    key: Key
    step: int
    root: Tensor
    residual: float
    eps: float
    lambda_max: float
    ok: bool
    method: str


def compute_roots(jobs: list[RootJob]) -> list[RootOutcome]:
    """Compute every job's root, batching the matrices that share size, p and options."""
    groups: dict[tuple[Any, ...], list[RootJob]] = defaultdict(list)
    for job in jobs:
        m = job.matrix
        groups[(job.options, job.p, m.shape, m.dtype, m.device)].append(job)
    outcomes = []
    for (opts, p, _, _, device), batch in groups.items():
        res = inverse_root(
            torch.stack([j.matrix for j in batch]),
            p,
            eps=opts.eps,
            relative_eps=opts.relative_eps,
            method=opts.method,
            dtype=opts.dtype,
            max_residual=opts.max_residual,
            retries=opts.retries,
            newton_max_iters=opts.newton_max_iters,
            newton_tol=opts.newton_tol,
        )
        info = torch.stack([res.residual, res.eps, res.lambda_max, res.ok.to(res.eps.dtype)], -1)
        method = opts.method.resolve(device).value
        for job, root, (residual, eps, lam, ok) in zip(batch, res.root.unbind(), info.tolist()):
            outcomes.append(RootOutcome(job.key, job.step, root, residual, eps, lam, bool(ok), method))
    return outcomes


class RootScheduler(Protocol):
    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        """Take the jobs due at optimizer step ``step``; return the outcomes to install now."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class InlineRoots:
    """The reference: roots are computed when due and installed in the same step."""

    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        return compute_roots(jobs)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
