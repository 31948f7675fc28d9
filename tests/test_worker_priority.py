"""The background workers' priority (``nice``) and thread settings: validated, and applied."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, RootJob, RootOutcome, compute_roots


class ReportPriority:
    """compute_roots, with the worker's nice value and torch thread count as each outcome's method."""

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        tag = f"nice={nice} threads={torch.get_num_threads()}"
        return [RootOutcome(o.key, o.step, o.root, o.residual, o.eps, o.lambda_max, o.ok, tag)
                for o in compute_roots(jobs)]  # fmt: skip


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nice=-1), "nice must be an integer from 0"),
        (dict(nice=20), "nice must be an integer from 0"),
        (dict(nice=2.5), "nice must be an integer from 0"),
        (dict(nice=True), "nice must be an integer from 0"),
        (dict(num_threads=0, workers="process"), "num_threads must be an integer ≥ 1, got 0"),
        (dict(num_threads=2, workers="thread"), "num_threads=2 applies to worker processes only"),
    ],
)
def test_bad_priority_and_thread_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        BackgroundRoots(**kw)


def _installed_methods(workers: str, nice: int) -> set[str]:
    w = torch.nn.Parameter(torch.randn(8, 8))
    sched = BackgroundRoots("deterministic", delay=0, workers=workers, nice=nice, num_threads=1,
                            compute_fn=ReportPriority())  # fmt: skip
    try:
        opt = Shampoo([w], block_size=8, precondition_frequency=10, start_preconditioning_step=1, scheduler=sched)
        w.grad = torch.randn(8, 8)
        opt.step()
        return {row["method"] for row in opt.diagnostics()["blocks"]}
    finally:
        sched.close()


@pytest.mark.skipif(not hasattr(os, "setpriority") or not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_worker_thread_runs_at_the_lower_priority_and_the_trainer_does_not():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base + 7 > 19:
        pytest.skip("already at the lowest priority")
    assert _installed_methods("thread", 7) == {f"nice={base + 7} threads={torch.get_num_threads()}"}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the training thread's is unchanged


@pytest.mark.skipif(not hasattr(os, "setpriority") or not os.path.exists("/proc/self/task"), reason="Linux only")
def test_a_worker_process_runs_at_the_lower_priority_with_its_thread_count():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 5 > 19:
        pytest.skip("already at the lowest priority")
    assert _installed_methods("process", 5) == {f"nice={base + 5} threads=1"}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
