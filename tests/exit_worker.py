"""A training script that ends while background roots are in flight.

Run by tests/test_interpreter_exit.py as a real interpreter. Usage:
    python -m tests.exit_worker MODE WORKERS CASE MARKER
CASE: ``running`` (exit while a job computes), ``queued`` (a second job waits in the
queue), ``raise`` (the training loop raises), ``collected`` (the optimizer was garbage
collected mid-computation). The script exits only once a job has started: the worker
is then inside real root work (eigh of 1024² statistics).
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, RootJob, RootOutcome, compute_roots


class MarkThenCompute:
    """compute_roots, after appending a line to ``path`` (so the script knows a job started)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        with open(self.path, "a") as f:
            f.write(f"{jobs[0].step}\n")
        return compute_roots(jobs)


def started(marker: str, n: int) -> None:
    """Wait until ``n`` jobs have started on a worker."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(marker) and len(open(marker).read().split()) >= n:
            return
        time.sleep(0.01)
    raise SystemExit("no job started")


def main() -> None:
    mode, workers, case, marker = sys.argv[1:5]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(2)])
    from tests.exit_worker import MarkThenCompute as Mark  # importable by a worker process

    sched = BackgroundRoots(mode, workers=workers, delay=5, max_staleness=50, compute_fn=Mark(marker))
    opt = Shampoo(model.parameters(), block_size=1024, precondition_frequency=1, start_preconditioning_step=2,
                  scheduler=sched)
    x = torch.randn(16, 1024)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    step()  # step 2 submits the first job
    started(marker, 1)
    if case == "queued":
        step()  # step 3 submits a second job, queued behind the first (one worker)
        print("queued", sched._tasks.qsize(), flush=True)
    if case == "collected":
        del opt, sched
        gc.collect()
    print("exiting", flush=True)
    if case == "raise":
        raise RuntimeError("the training loop failed")
    # otherwise fall off the end without close()


if __name__ == "__main__":
    main()
