"""Background roots: bit-identical to the inline reference, checkpoints, faults, no leaks.

Every test trains a real Shampoo on a small MLP; faults are injected through the
documented ``compute_fn`` hook, with real threads and processes.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import random
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from conftest import train

from scalable_shampoo import Shampoo
from scalable_shampoo.background import (
    BackgroundRoots,
    InlineRoots,
    RootJob,
    RootOutcome,
    RootTimeoutError,
    RootWorkerError,
    compute_roots,
)

FREQ, START = 3, 2


# ---------------------------------------------------------------------- injected faults (picklable)
class Sleepy:
    """compute_roots after a random sleep, so results arrive late and out of order."""

    def __init__(self, max_sleep: float = 0.03, seed: int = 0, min_sleep: float = 0.0) -> None:
        self.min_sleep, self.max_sleep, self.rng = min_sleep, max_sleep, random.Random(seed)

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        time.sleep(self.rng.uniform(self.min_sleep, self.max_sleep))
        return compute_roots(jobs)


class FailAt:
    """Raise for the jobs taken at parameter step ``step``; compute the others."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        if any(j.step == self.step for j in jobs):
            raise ValueError(f"injected failure at step {self.step}")
        return compute_roots(jobs)


class HangFrom:
    """Hang (until ``release`` is set, or for an hour in a process) from parameter step ``step`` on."""

    def __init__(self, step: int, release: threading.Event | None = None) -> None:
        self.step, self.release = step, release

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        if any(j.step >= self.step for j in jobs):
            if self.release is None:
                time.sleep(3600)
            else:
                self.release.wait()
        return compute_roots(jobs)


# ---------------------------------------------------------------------- helpers
def make(scheduler, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    opt = Shampoo(model.parameters(), lr=3e-2, precondition_frequency=FREQ, start_preconditioning_step=START,
                  scheduler=scheduler)
    return model, opt


def regression_loss(model, i: int):
    """The loss on batch ``i`` of a fixed regression task (its own seed per batch)."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 8, generator=g)
    y = torch.sin(x[:, :4] * 2) + x[:, 4:] ** 2
    return torch.nn.functional.mse_loss(model(x), y)


def fit(model, opt, steps: int, first: int = 0) -> float:
    """Steps ``first`` … ``first + steps - 1`` of the regression task; the last loss."""
    return train(model, opt, range(first, first + steps), regression_loss)


def evaluate(model) -> float:
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), torch.sin(x[:, :4] * 2) + x[:, 4:] ** 2))


def assert_bitwise(a, b) -> None:
    (ma, oa), (mb, ob) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb)
        sa, sb = oa.state[pa], ob.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k
    assert oa.global_step == ob.global_step


def root_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("scalable-shampoo-roots")]


@pytest.fixture(autouse=True)
def no_leaks():
    yield
    if root_threads() or mp.active_children():
        gc.collect()  # an unclosed scheduler is stopped by its finalizer
    deadline = time.monotonic() + 5
    while (root_threads() or mp.active_children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not root_threads(), threading.enumerate()
    assert not mp.active_children()


def reference(delay: int, steps: int):
    ref = make(InlineRoots(delay=delay))
    fit(*ref, steps)
    return ref


# ---------------------------------------------------------------------- the reference
def test_inline_delay_installs_roots_delay_steps_later():
    for delay in (0, 2):
        model, opt = make(InlineRoots(delay=delay))
        fit(model, opt, START + delay - 1)
        assert not any(k.startswith("root.") for s in opt.state.values() for k in s)
        fit(model, opt, 1, START + delay - 1)
        w = model[0].weight
        assert float(opt.state[w]["root_info.0.0"][0]) == START  # the statistic of step START


def test_inline_delay_zero_is_the_default():
    a, b = make(None), make(InlineRoots(0))
    fit(*a, 12)
    fit(*b, 12)
    assert_bitwise(a, b)


# ---------------------------------------------------------------------- deterministic mode
@pytest.mark.parametrize("delay", [0, 1, 5])  # 5 > FREQ: several pending jobs per key
def test_deterministic_threads_bitwise_with_late_out_of_order_results(delay):
    steps = 30
    ref = reference(delay, steps)
    sched = BackgroundRoots("deterministic", delay=delay, workers="thread", num_workers=2,
                            compute_fn=Sleepy(0.02, seed=delay))
    bg = make(sched)
    fit(*bg, steps)
    sched.close()
    assert_bitwise(ref, bg)


def test_deterministic_process_bitwise_and_inline_fallback_with_warning():
    steps, delay = 12, 2
    ref = reference(delay, steps)
    sched = BackgroundRoots("deterministic", delay=delay, workers="process", on_error="inline",
                            compute_fn=FailAt(START + FREQ))
    bg = make(sched)
    with pytest.warns(RuntimeWarning, match=r"\(0, 0, 0\).*ValueError: injected failure"):
        fit(*bg, steps)
    bg[1].close()
    assert_bitwise(ref, bg)


def test_thread_inline_fallback_is_bitwise():
    ref = reference(3, 20)
    bg = make(BackgroundRoots(delay=3, workers="thread", on_error="inline", compute_fn=FailAt(START)))
    with pytest.warns(RuntimeWarning, match="computing these roots inline"):
        fit(*bg, 20)
    bg[1].close()
    assert_bitwise(ref, bg)


# ---------------------------------------------------------------------- latency mode
def test_latency_trains_like_inline_and_respects_the_staleness_bound():
    steps, bound = 30, 4
    ref = make(InlineRoots())
    initial = evaluate(ref[0])
    fit(*ref, steps)
    model, opt = make(BackgroundRoots("latency", max_staleness=bound, workers="thread", compute_fn=Sleepy(0.05)))
    w = model[0].weight
    for i in range(steps):
        fit(model, opt, 1, i)
        step = opt.global_step
        due = [s for s in range(START, step + 1, FREQ) if s + bound <= step]
        if due:  # the newest job that is `bound` steps old has been installed
            assert float(opt.state[w]["root_info.0.0"][0]) >= due[-1]
    opt.close()
    assert evaluate(ref[0]) < 0.8 * initial
    assert abs(evaluate(model) - evaluate(ref[0])) < 0.1 * evaluate(ref[0])


def test_latency_never_waits_for_a_slow_worker():
    release = threading.Event()
    model, opt = make(BackgroundRoots("latency", max_staleness=50, workers="thread", compute_fn=HangFrom(0, release)))
    # the worker hangs until `release`; were any step to wait for it, training could only
    # end after the timer frees it (no wall-clock bound, so a loaded machine cannot fail this)
    timer = threading.Timer(120, release.set)
    timer.start()
    fit(model, opt, 20)  # roots are due at 2, 5, …, none arrives
    assert not release.is_set(), "a step waited for the hung root worker"
    timer.cancel()
    assert not any(k.startswith("root.") for s in opt.state.values() for k in s)
    release.set()
    opt.close()


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode", ["deterministic", "latency"])
def test_checkpoint_while_pending_resumes_bitwise(mode):
    delay, first, total = 4, START + FREQ + 1, 24

    def sched():
        if mode == "deterministic":
            return BackgroundRoots(delay=delay, workers="thread", compute_fn=Sleepy(0.02))
        # slow enough that the job of step 5 is still running at the checkpoint after step 6,
        # however loaded the machine (a fast result would be installed, leaving nothing pending)
        return BackgroundRoots("latency", max_staleness=delay, workers="thread", compute_fn=Sleepy(0.6, min_sleep=0.5))

    model, opt = make(sched())
    fit(model, opt, first)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert opt.state_dict()["scalable_shampoo"]["scheduler"]["pending"], "nothing was pending"
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fit(model, opt, total - first, first)  # the uninterrupted run
    opt.close()

    model2, opt2 = make(sched(), seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    if mode == "latency":
        # what latency mode promises after a resume: every result pending at the checkpoint is
        # installed at the first step after it (its root, bit for bit, from the step it was
        # submitted at), none is lost, and no root is ever older than max_staleness
        pending = [o for e in ckpt["opt"]["scalable_shampoo"]["scheduler"]["pending"] for o in e["outcomes"]]
        params = list(model2.parameters())
        assert pending and all(o["ok"] for o in pending)
        fit(model2, opt2, 1, first)
        for o in pending:
            (i, b, a), st = o["key"], opt2.state[params[o["key"][0]]]
            assert torch.equal(st[f"root.{b}.{a}"], o["root"]), o["key"]
            assert float(st[f"root_info.{b}.{a}"][5]) == o["step"]  # installed: the step it came from
        for i in range(first + 1, total):
            fit(model2, opt2, 1, i)
            rows = opt2.diagnostics()["blocks"]
            assert rows and all(r["has_root"] and r["staleness"] <= delay + FREQ for r in rows), rows
    else:
        fit(model2, opt2, total - first, first)
    opt2.close()
    if mode == "deterministic":
        assert_bitwise((model, opt), (model2, opt2))
        ref = reference(delay, total)
        assert_bitwise(ref, (model2, opt2))


def test_checkpoint_moves_between_inline_and_background():
    delay, first, total = 2, START + 1, 15
    model, opt = make(InlineRoots(delay))
    fit(model, opt, first)
    sd = opt.state_dict()
    assert sd["scalable_shampoo"]["scheduler"]["pending"]
    bg = make(BackgroundRoots(delay=delay, workers="thread"))
    bg[0].load_state_dict(model.state_dict())
    bg[1].load_state_dict(sd)
    fit(*bg, total - first, first)
    bg[1].close()
    assert_bitwise(reference(delay, total), bg)


# ---------------------------------------------------------------------- faults
def test_worker_exception_names_the_key_and_keeps_previous_roots():
    model, opt = make(BackgroundRoots(delay=1, workers="thread", compute_fn=FailAt(START + FREQ)))
    fit(model, opt, START + FREQ)
    w = model[0].weight
    before = opt.state[w]["root.0.0"].clone()
    with pytest.raises(RootWorkerError, match=r"\(0, 0, 0\).*ValueError: injected failure at step 5") as err:
        fit(model, opt, 1, START + FREQ)
    assert isinstance(err.value.__cause__, ValueError)
    assert torch.equal(opt.state[w]["root.0.0"], before)
    fit(model, opt, 4, START + FREQ + 1)  # the scheduler keeps working after the error
    assert float(opt.state[w]["root_info.0.0"][0]) == START + 2 * FREQ
    opt.close()


def test_hung_thread_trips_the_staleness_bound():
    release = threading.Event()
    model, opt = make(BackgroundRoots("latency", max_staleness=3, timeout=0.3, workers="thread",
                                      compute_fn=HangFrom(START + FREQ, release)))
    t0 = time.monotonic()
    with pytest.raises(RootTimeoutError, match=r"block key\(s\) \(0, 0, 0\).*submitted at step 5.*hung"):
        fit(model, opt, 20)
    assert opt.global_step == START + FREQ + 3 and time.monotonic() - t0 < 10
    release.set()
    opt.close()


def test_hung_process_times_out_and_close_kills_it():
    model, opt = make(BackgroundRoots(delay=1, timeout=0.5, workers="process", compute_fn=HangFrom(START)))
    with pytest.raises(RootTimeoutError, match=r"\(0, 0, 0\)"):
        fit(model, opt, 10)
    pid = opt.scheduler._runners[0].process.pid
    t0 = time.monotonic()
    opt.close()
    assert time.monotonic() - t0 < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_timeout_falls_back_inline():
    release = threading.Event()
    model, opt = make(BackgroundRoots(delay=1, timeout=0.2, workers="thread", on_error="inline",
                                      compute_fn=HangFrom(START + FREQ, release)))
    with pytest.warns(RuntimeWarning, match="not done after"):
        fit(model, opt, 10)
    release.set()
    opt.close()
    assert float(opt.state[model[0].weight]["root_info.0.0"][0]) == 8


# ---------------------------------------------------------------------- lifecycle
def test_garbage_collection_stops_the_worker_threads():
    model, opt = make(BackgroundRoots(delay=1, workers="thread", num_workers=2))
    fit(model, opt, 8)
    assert len(root_threads()) == 2
    del model, opt
    gc.collect()
    deadline = time.monotonic() + 5
    while root_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not root_threads()


def test_closed_scheduler_refuses_to_run():
    sched = BackgroundRoots(workers="thread")
    sched.close()
    sched.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sched.run(1, [])


def test_interpreter_exit_leaves_no_process_behind(tmp_path):
    script = (
        "import sys; sys.path.insert(0, 'tests')  # where conftest is\n"
        "import torch, tests.test_background as t\n"
        "from scalable_shampoo.background import BackgroundRoots\n"
        "s = BackgroundRoots('latency', workers='process', compute_fn=t.HangFrom(0))\n"
        "m, o = t.make(s)\n"
        "t.fit(m, o, 3)\n"
        "print(s._runners[0].process.pid, flush=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(out.stdout.split()[-1]), 0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="fast"), "mode must be one of"),
        (dict(delay=-1), "delay must be an integer"),
        (dict(workers="gpu"), "workers must be one of"),
        (dict(on_error="ignore"), "on_error must be one of"),
        (dict(timeout=0), "timeout must be > 0"),
        (dict(cuda="stream", workers="process"), "needs workers='thread'"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        BackgroundRoots(**kw)


# ---------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda", ["host", "stream"])
def test_cuda_roots_come_back_on_the_device(cuda):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).cuda()
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=FREQ, start_preconditioning_step=START,
                  root_dtype=torch.float64,
                  scheduler=BackgroundRoots(delay=1, workers="thread", cuda=cuda))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(10):
            x = torch.randn(32, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    root = opt.state[model[0].weight]["root.0.0"]
    assert root.device.type == "cuda" and root.dtype == torch.float32 and torch.isfinite(root).all()
    opt.close()


def test_compute_roots_in_batches_equals_one_matrix_at_a_time():
    """A group of 40 equal matrices is split into ROOT_BATCHES batches; each root is the one
    computed alone, to rounding (batched matmuls may round differently with the batch size)."""
    from scalable_shampoo.background import ROOT_BATCHES, RootJob, RootOptions, compute_roots
    from scalable_shampoo.matrix_roots import RootMethod

    gen = torch.Generator().manual_seed(0)
    opts = RootOptions(method=RootMethod.EIGH, eps=1e-6, relative_eps=True, dtype=torch.float32,
                       max_residual=0.5, retries=3, newton_max_iters=100, newton_tol=1e-6)  # fmt: skip
    mats = [(lambda g: g @ g.T)(torch.randn(12, 20, generator=gen)) for _ in range(40)]
    jobs = [RootJob((0, i, 0), 1, m, 4, opts) for i, m in enumerate(mats)]
    together = compute_roots(jobs)
    assert ROOT_BATCHES < len(jobs) and [o.key for o in together] == [j.key for j in jobs]
    for job, out in zip(jobs, together):
        alone = compute_roots([job])[0]
        assert out.ok and alone.ok and out.method == alone.method == "eigh/fp32"
        torch.testing.assert_close(out.root, alone.root, rtol=1e-5, atol=1e-6)
