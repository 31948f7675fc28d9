"""Root jobs and the scheduler that decides where they run and when results apply.

The optimizer hands the scheduler the jobs that are due at a step and installs
whatever the scheduler returns (paper §3–4, the Lingvo design):

* :class:`InlineRoots` ``(delay=d)``, the reference: roots are computed at once
  from the live statistics of step ``s`` and installed at step ``s + d``.
* :class:`BackgroundRoots` computes the same jobs from *snapshots* (clones) of
  the statistics on background workers:

  - ``mode="deterministic"``: each result is installed exactly at step
    ``s + delay`` (the step waits if it is late), so a run is bit-identical to
    ``InlineRoots(delay)``: same snapshots, same batches, same code.
  - ``mode="latency"`` (the paper): a result is installed at the first step
    after it is ready, and the step never waits, except for a result whose
    job is ``max_staleness`` steps old: it is installed at step
    ``s + max_staleness`` at the latest, so a stuck worker cannot silently
    freeze the preconditioner (after ``timeout`` seconds the step raises
    :class:`RootTimeoutError` naming the block keys).

  Results for a key always apply in submission order.

**Threads or a process.** ``workers="thread"`` (the default) runs the
computation on daemon threads of this process (torch ops release the GIL; the
worker uses the process's torch thread count, which ``torch.set_num_threads`` sets
for the whole process, so a worker thread can't have fewer threads than the trainer).
``workers="process"`` runs each worker in a spawned process with ``num_threads``
torch/OpenMP threads (``OMP_WAIT_POLICY=passive``); it costs ~2 s of start-up
(importing torch) and pickles each snapshot and root. ``nice`` (0–19) lowers the
workers' CPU priority below the trainer's: the worker process's, or each worker
thread's alone (Linux sets nice per thread; the OpenMP threads a worker thread
starts inherit it).
Measured on the 2-core CPU (``python -m scalable_shampoo_bench.background_time``:
4×Linear(512), eigh roots every 20 steps, 80 steps, 1 torch thread, medians of 3
interleaved repeats, other processes using ≤ 2% of the CPU; figures in
``scalable_shampoo_bench/results/background_time.json``), end-to-end time relative
to inline: latency/thread 0.68, latency/process 0.71, deterministic/thread 0.80,
deterministic/process 0.79; max step 0.095 s (latency/thread) vs 0.12 s
(latency/process) vs 0.59 s (inline). Threads were faster in latency mode and as
fast in deterministic mode, and start without importing torch again, hence the default.

**CUDA parameters.** ``cuda="host"`` (default): the snapshot is copied into
pinned host memory with a ``non_blocking`` copy, the worker waits for that copy's
event, computes on the CPU (in ``RootOptions.dtype``, fp64 if asked), and the
root goes back with a ``non_blocking`` copy from pinned memory when installed.
``cuda="stream"`` (threads only): the snapshot and the roots are computed on
the GPU in a side CUDA stream, and the training stream waits for it only when
the result is installed.

**Faults.** An exception in a worker raises :class:`RootWorkerError` naming the
block keys and the cause, or, with ``on_error="inline"``, warns and computes
those roots in the training thread from the same snapshot (so deterministic mode
stays bit-identical). A failed job installs nothing, so the previous roots stay.
``close()``, garbage collection of the scheduler and interpreter exit stop every
thread and process (a process stuck in a computation is killed). At interpreter
exit queued jobs are dropped and a thread in the middle of a computation is waited
for until it ends its current batch of matrices (at most ``timeout`` seconds): a
thread left inside a torch op while the interpreter finalizes would abort the
process (``terminate called without an active exception``). Tests inject
sleeps, exceptions and hangs through ``compute_fn`` (default
:func:`compute_roots`; it must be a picklable top-level function for processes).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import threading
import traceback
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from .matrix_roots import RootMethod, eigenbasis, inverse_root, power_step_basis

__all__ = [
    "BackgroundRoots",
    "InlineRoots",
    "RootJob",
    "RootOptions",
    "RootOutcome",
    "RootScheduler",
    "RootTimeoutError",
    "RootWorkerError",
    "compute_roots",
]

Key = tuple[int, int, int]  # (parameter index in param_groups order, block, axis)
ComputeFn = Callable[[list["RootJob"]], list["RootOutcome"]]


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
    eigenbasis: bool = False  # the job's result is the eigenvector matrix Q (eigenvalue-corrected), not a root
    qr_refresh: bool = False  # the job's matrix is L·Q_prev, and its result the Q of its QR (``basis_refresh="qr"``)


@dataclass
class RootJob:
    key: Key
    step: int  # the parameter's step at which the statistic was taken
    matrix: Tensor
    exponent: int  # p in L^(-1/p)
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


ROOT_BATCHES = 16  # a group of equal matrices is computed in at most this many batches

# Interpreter exit. A worker thread that is inside a torch op when the interpreter
# finalizes, and returns from it afterwards, is torn down by CPython in the middle of
# C++ code, which aborts the process ("terminate called without an active
# exception", exit code 134). So at exit every worker thread is told to stop and
# joined: queued jobs are dropped, and a job in progress stops at the end of its
# current batch (``_EXITING`` is checked between batches).
_EXITING = threading.Event()
_FINALIZERS: set[weakref.finalize] = set()  # of the schedulers not yet closed or collected
_THREADS: weakref.WeakKeyDictionary[threading.Thread, float] = weakref.WeakKeyDictionary()  # → exit wait (s)


class _Stopped(Exception):
    """A root computation abandoned because the interpreter is exiting."""


def _at_exit() -> None:
    _EXITING.set()
    for f in list(_FINALIZERS):
        f()  # drop queued jobs, stop the workers (a worker process is killed)
    for t, wait in list(_THREADS.items()):
        t.join(wait)  # a thread in a torch op finishes its batch first


atexit.register(_at_exit)


def compute_roots(jobs: list[RootJob]) -> list[RootOutcome]:
    """Compute every job's root, batching the matrices that share size, p and options.

    A job whose options ask for an ``eigenbasis`` (the eigenvalue-corrected
    preconditioner) gets the eigenvectors of its statistic instead
    (:func:`~scalable_shampoo.matrix_roots.eigenbasis`), through the same batches.

    A batch holds at most 1/``ROOT_BATCHES`` of its group's matrices: the working
    memory (the stacked batch, its damped copy, eigenvectors, the root, fallbacks:
    ~7 copies of a batch) then stays near one extra copy of the statistics being
    processed, plus the new roots. Measured peak growth for 96 matrices of 256²
    (24 MB of statistics, 24 MB of new roots): 35–37 MB with this split, 168 MB as
    one batch (``python -m scalable_shampoo_bench.memory_report --sections roots``).
    """
    groups: dict[tuple[Any, ...], list[RootJob]] = defaultdict(list)
    for job in jobs:
        m = job.matrix
        groups[(job.options, job.exponent, m.shape, m.dtype, m.device)].append(job)
    outcomes = []
    chunks = []
    for key, group in groups.items():
        size = max(1, -(-len(group) // ROOT_BATCHES))
        chunks += [(key, group[i : i + size]) for i in range(0, len(group), size)]
    for (opts, exponent, _, _, _), batch in chunks:
        if _EXITING.is_set() and threading.current_thread() is not threading.main_thread():
            raise _Stopped("the interpreter is exiting")
        stack = torch.stack([j.matrix for j in batch])
        if opts.qr_refresh:
            res = power_step_basis(stack, dtype=opts.dtype)
        elif opts.eigenbasis:
            res = eigenbasis(stack, eps=opts.eps, relative_eps=opts.relative_eps, dtype=opts.dtype,
                             max_residual=opts.max_residual, retries=opts.retries)  # fmt: skip
        else:
            res = inverse_root(
                stack,
                exponent,
                eps=opts.eps,
                relative_eps=opts.relative_eps,
                method=opts.method,
                dtype=opts.dtype,
                max_residual=opts.max_residual,
                retries=opts.retries,
                newton_max_iters=opts.newton_max_iters,
                newton_tol=opts.newton_tol,
            )
        info = torch.stack([res.residual, res.eps, res.lambda_max, res.stage.to(res.eps.dtype)], -1)
        for job, root, (residual, eps, lam, stage) in zip(batch, res.root.unbind(), info.tolist(), strict=True):
            ok = stage >= 0  # the fallback stage that gave the root, or -1
            method = res.stages[int(stage)] if ok else "rejected"
            outcomes.append(RootOutcome(job.key, job.step, root, residual, eps, lam, ok, method))
    return outcomes


class RootScheduler(Protocol):
    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        """Take the jobs due at optimizer step ``step``; return the outcomes to install now."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RootWorkerError(RuntimeError):
    """A background root computation failed; the message names the block keys and the cause."""


class RootTimeoutError(RootWorkerError, TimeoutError):
    """A background root computation was not done within the timeout (the worker may hang)."""


# ---------------------------------------------------------------------- pending results
@dataclass
class _Entry:
    """The jobs submitted at one step, as one unit of work."""

    submit_step: int
    apply_step: int  # deterministic mode installs exactly here
    keys: list[Key]
    devices: dict[Key, torch.device]
    future: Future[list[RootOutcome]]
    snapshot: list[RootJob] = field(default_factory=list)  # for the inline fallback
    stream: Any = None  # the side CUDA stream the result was computed on

    def describe(self) -> str:
        keys = ", ".join(map(str, self.keys[:8])) + (", …" if len(self.keys) > 8 else "")
        return f"block key(s) {keys} submitted at step {self.submit_step}"


def _done(outcomes: list[RootOutcome]) -> Future[list[RootOutcome]]:
    f: Future[list[RootOutcome]] = Future()
    f.set_result(outcomes)
    return f


def _pack(entries: list[_Entry], outcomes: list[list[RootOutcome]], apply: list[int]) -> dict[str, Any]:
    """Pending results as plain ints, floats, strings and tensors (``weights_only`` loads them)."""
    packed = []
    for e, outs, a in zip(entries, outcomes, apply, strict=True):
        rows = [
            dict(key=list(o.key), step=o.step, root=o.root.clone(), residual=o.residual, eps=o.eps,
                 lambda_max=o.lambda_max, ok=o.ok, method=o.method, device=str(e.devices.get(o.key, o.root.device)))
            for o in outs
        ]
        packed.append(dict(submit_step=e.submit_step, apply_step=a, outcomes=rows))
    return {"format": 1, "pending": packed}


def _unpack(state: dict[str, Any]) -> list[_Entry]:
    entries = []
    for item in state.get("pending", []):
        outs, devices = [], {}
        for r in item["outcomes"]:
            key: Key = (int(r["key"][0]), int(r["key"][1]), int(r["key"][2]))
            devices[key] = torch.device(r["device"])
            outs.append(RootOutcome(key, int(r["step"]), r["root"], float(r["residual"]), float(r["eps"]),
                                    float(r["lambda_max"]), bool(r["ok"]), str(r["method"])))
        keys = [o.key for o in outs]
        entries.append(_Entry(int(item["submit_step"]), int(item["apply_step"]), keys, devices, _done(outs)))
    return entries


def _held(pending: list[_Entry]) -> list[Tensor]:
    """Snapshots and finished roots of pending entries (for ``Shampoo.memory()``)."""
    out = [j.matrix for e in pending for j in e.snapshot]
    for e in pending:
        if e.future.done() and not e.future.cancelled() and e.future.exception() is None:
            out += [o.root for o in e.future.result()]
    return out


def _to_devices(outcomes: list[RootOutcome], devices: dict[Key, torch.device]) -> list[RootOutcome]:
    out = []
    for o in outcomes:
        dev = devices.get(o.key, o.root.device)
        out.append(o if o.root.device == dev else replace(o, root=o.root.to(dev, non_blocking=True)))
    return out


class InlineRoots:
    """The reference: roots computed when due from the live statistics, installed ``delay`` steps later."""

    def __init__(self, delay: int = 0) -> None:
        if not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay must be an integer ≥ 0, got {delay!r}")
        self.delay = delay
        self._pending: list[_Entry] = []

    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        if jobs:
            outs = compute_roots(jobs)
            if self.delay == 0 and not self._pending:
                return outs
            devices = {j.key: j.matrix.device for j in jobs}
            self._pending.append(_Entry(step, step + self.delay, [j.key for j in jobs], devices, _done(outs)))
        result: list[RootOutcome] = []
        while self._pending and self._pending[0].apply_step <= step:
            e = self._pending.pop(0)
            result += _to_devices(e.future.result(), e.devices)
        return result

    def state_dict(self) -> dict[str, Any]:
        return _pack(self._pending, [e.future.result() for e in self._pending], [e.apply_step for e in self._pending])

    def tensors(self) -> list[Tensor]:
        """The tensors this scheduler holds: roots computed but not installed yet (``delay`` > 0)."""
        return _held(self._pending)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = _unpack(state)

    def close(self) -> None:
        pass

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy, pickle: the delay and the pending results
        return {"delay": self.delay, "pending": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["delay"])  # type: ignore[misc]
        self.load_state_dict(state["pending"])


# ---------------------------------------------------------------------- workers
def _process_main(conn: Any, compute_fn: ComputeFn, num_threads: int, nice: int) -> None:
    """A worker process: receive pickled jobs, send back ``("ok", outcomes)`` or ``("err", …)``."""
    torch.set_num_threads(num_threads)
    _lower_priority(nice)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:  # the stop message
            return
        try:
            outs = compute_fn(pickle.loads(data))
            payload = pickle.dumps(("ok", [replace(o, root=o.root.clone()) for o in outs]))  # a storage per root
        except BaseException as exc:  # noqa: B036 - reported to the training thread
            try:
                payload = pickle.dumps(("err", exc, traceback.format_exc()))
            except Exception:
                payload = pickle.dumps(("err", RuntimeError(repr(exc)), traceback.format_exc()))
        conn.send_bytes(payload)


class _ProcessRunner:
    """Runs ``compute_fn`` in a child process; called from one proxy thread."""

    _env_lock = threading.Lock()

    def __init__(self, compute_fn: ComputeFn, num_threads: int, nice: int, start_method: str) -> None:
        ctx: Any = mp.get_context(start_method)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_process_main, args=(child, compute_fn, num_threads, nice), daemon=True,
            name="scalable-shampoo-roots",
        )
        env = {"OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads), "OMP_WAIT_POLICY": "PASSIVE"}
        with self._env_lock:  # a spawned child copies os.environ when it starts
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self.process.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        child.close()
        self.busy = False

    def __call__(self, jobs: list[RootJob]) -> list[RootOutcome]:
        self.busy = True
        try:
            self.conn.send_bytes(pickle.dumps(jobs))
            status, *rest = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the root worker process stopped (exit code {self.process.exitcode})") from exc
        finally:
            self.busy = False
        if status == "err":
            error, tb = rest
            raise error from RuntimeError(f"in the root worker process:\n{tb}")
        outcomes: list[RootOutcome] = rest[0]
        return outcomes

    def stop(self, timeout: float) -> None:
        """Let an idle process exit; kill one that is computing (its result would be dropped)."""
        try:
            self.conn.send_bytes(b"")
        except (OSError, ValueError):
            pass
        self.process.join(0.05 if self.busy else timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()


Task = tuple[Future, list[RootJob], Any, bool]  # future, jobs, CUDA event to wait for, pin the results


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux: per thread; the OpenMP threads it
    starts inherit it). Lowering one's priority needs no privilege; a failure leaves it as it was."""
    if nice:
        try:
            tid = threading.get_native_id()  # Linux: this thread alone (elsewhere no such process: ignored)
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError:
            pass


def _worker_loop(tasks: queue.Queue[Task | None], call: ComputeFn, stream: Any, nice: int = 0) -> None:
    """A worker thread: take tasks until ``None``; never holds a reference to the scheduler."""
    _lower_priority(nice)
    while True:
        item = tasks.get()
        if item is None:
            return
        future, jobs, event, pin = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            if event is not None:
                event.synchronize()  # the non_blocking copy into pinned memory is done
            if stream is not None:
                with torch.cuda.stream(stream):
                    outs = call(jobs)
            else:
                outs = call(jobs)
            if pin:
                outs = [replace(o, root=o.root.pin_memory()) for o in outs]
            future.set_result(outs)
        except BaseException as exc:  # noqa: B036 - surfaces in the training thread
            future.set_exception(exc)


def _shutdown(tasks: queue.Queue[Task | None], threads: list[threading.Thread], runners: list[_ProcessRunner],
              timeout: float) -> None:
    while True:  # drop what has not started
        try:
            item = tasks.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            item[0].cancel()
    for _ in threads:
        tasks.put(None)
    for r in runners:
        r.stop(timeout)  # unblocks its proxy thread
    for t in threads:
        t.join(timeout)  # interpreter exit joins whatever is still running (see _at_exit)


class BackgroundRoots:
    """Roots computed from snapshots on background workers (see the module docstring).

    Args:
        mode: ``"deterministic"`` (install at submit step + ``delay``) or ``"latency"``.
        delay: deterministic mode's delay in steps (≥ 0).
        max_staleness: latency mode installs a result at submit step + this at the latest.
        workers: ``"thread"`` (default, measured faster on a 2-core CPU) or ``"process"``.
        num_workers: how many threads or processes take jobs from the shared queue.
        num_threads: torch/OpenMP threads inside each worker process (worker threads use the
            process's torch thread count, which is process-wide: any other value is refused for them).
        nice: how much lower the workers' CPU priority is than the trainer's, 0 (equal) to 19
            (lowest): the worker process, or each worker thread alone (Linux; the OpenMP
            threads it starts inherit it). With a higher nice the worker takes less of the
            trainer's cores and its results arrive later (see the README: *Background roots:
            how many cores*).
        timeout: seconds a step waits for a result before raising :class:`RootTimeoutError`.
        on_error: ``"raise"`` or ``"inline"`` (warn and compute in the training thread).
        compute_fn: the computation, :func:`compute_roots` unless a test injects faults.
        cuda: ``"host"`` (pinned host copies, CPU roots) or ``"stream"`` (side CUDA stream, threads only).
        start_method: multiprocessing start method for worker processes.
    """

    def __init__(
        self,
        mode: str = "deterministic",
        delay: int = 1,
        max_staleness: int = 100,
        *,
        workers: str = "thread",
        num_workers: int = 1,
        num_threads: int = 1,
        nice: int = 0,
        timeout: float = 300.0,
        on_error: str = "raise",
        compute_fn: ComputeFn = compute_roots,
        cuda: str = "host",
        start_method: str = "spawn",
    ) -> None:
        for name, value, choices in (
            ("mode", mode, ("deterministic", "latency")),
            ("workers", workers, ("process", "thread")),
            ("on_error", on_error, ("raise", "inline")),
            ("cuda", cuda, ("host", "stream")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        for name, v, lo in (("delay", delay, 0), ("max_staleness", max_staleness, 0), ("num_workers", num_workers, 1),
                            ("num_threads", num_threads, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")
        if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an integer from 0 (the trainer's priority) to 19 (lowest), got {nice!r}")
        if nice and not hasattr(os, "setpriority"):
            raise ValueError(f"nice={nice} needs os.setpriority (Linux, macOS); this platform has none")
        if workers == "thread" and num_threads != 1:
            raise ValueError(
                f"num_threads={num_threads} applies to worker processes only: a worker thread uses the process's "
                "torch thread count (torch.set_num_threads is process-wide); use workers='process'"
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if cuda == "stream" and workers != "thread":
            raise ValueError("cuda='stream' needs workers='thread'")
        self._config = dict(
            mode=mode, delay=delay, max_staleness=max_staleness, workers=workers, num_workers=num_workers,
            num_threads=num_threads, nice=nice, timeout=timeout, on_error=on_error, compute_fn=compute_fn, cuda=cuda,
            start_method=start_method,
        )  # fmt: skip  # what a copy is built from
        self.mode, self.delay, self.max_staleness = mode, delay, max_staleness
        self.timeout, self.on_error, self.cuda = timeout, on_error, cuda
        self._pending: list[_Entry] = []
        self._last_step = 0
        self._closed = False
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._runners = [
            _ProcessRunner(compute_fn, num_threads, nice, start_method) for _ in range(num_workers)
        ] if workers == "process" else []
        self._stream = torch.cuda.Stream() if cuda == "stream" and torch.cuda.is_available() else None
        calls: list[ComputeFn] = list(self._runners) or [compute_fn] * num_workers
        self._threads = [
            threading.Thread(target=_worker_loop, args=(self._tasks, c, self._stream, 0 if self._runners else nice),
                             daemon=True,
                             name=f"scalable-shampoo-roots-{i}")
            for i, c in enumerate(calls)
        ]
        for t in self._threads:
            t.start()
            _THREADS[t] = timeout
        # run at garbage collection, or at interpreter exit by _at_exit (not by weakref's own
        # exit hook, which would leave a thread that is still computing to be torn down)
        self._finalizer = weakref.finalize(self, _shutdown, self._tasks, self._threads, self._runners, 1.0)
        self._finalizer.atexit = False
        _FINALIZERS.difference_update([f for f in _FINALIZERS if not f.alive])
        _FINALIZERS.add(self._finalizer)

    # ------------------------------------------------------------------ the protocol
    def run(self, step: int, jobs: list[RootJob]) -> list[RootOutcome]:
        if self._closed:
            raise RuntimeError("BackgroundRoots is closed")
        self._last_step = step
        if jobs:
            self._submit(step, jobs)
        ready: list[_Entry] = []
        if self.mode == "deterministic":
            while self._pending and self._pending[0].apply_step <= step:
                ready.append(self._pending.pop(0))
        else:
            blocked: set[Key] = set()
            for e in list(self._pending):
                overdue = step - e.submit_step >= self.max_staleness
                if overdue or (e.future.done() and blocked.isdisjoint(e.keys)):
                    ready.append(e)
                    self._pending.remove(e)
                else:
                    blocked.update(e.keys)
        result: list[RootOutcome] = []
        for i, e in enumerate(ready):
            try:
                result += self._install_ready(e)
            except RootWorkerError:  # what was ready stays pending for the next step; e is dropped
                done = [replace(r, future=_done(r.future.result())) for r in ready[:i] if r.future.done()]
                self._pending[:0] = done + [r for r in ready[i + 1 :]]
                raise
        return result

    def state_dict(self) -> dict[str, Any]:
        outs = []
        for e in list(self._pending):  # wait for every pending computation
            try:
                outs.append(self._result(e))
            except RootWorkerError:
                self._pending.remove(e)
                raise
        for e, o in zip(self._pending, outs, strict=True):
            e.future, e.snapshot = _done(o), []  # keep them pending here, with their results
        apply = [e.apply_step if self.mode == "deterministic" else self._last_step + 1 for e in self._pending]
        return _pack(self._pending, outs, apply)

    def tensors(self) -> list[Tensor]:
        """The tensors this scheduler holds: the snapshots of jobs still pending and the roots
        that are done but not installed yet (a job in flight also holds a batch's working memory)."""
        return _held(self._pending)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = _unpack(state)
        if self._pending:
            self._last_step = self._pending[0].submit_step

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (a worker process stuck in a computation is killed); pending results are dropped."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            _FINALIZERS.discard(self._finalizer)
            _shutdown(self._tasks, self._threads, self._runners, timeout)
            self._pending.clear()

    # ------------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        """The settings and the pending results (waiting for any still computing, as
        ``state_dict`` does). A copy starts its own workers; its pending results are the
        original's, installed at the same steps (deterministic mode: bit-identical)."""
        if self._closed:
            raise RuntimeError(
                "this BackgroundRoots was closed (close() stopped its workers), so it cannot be copied or "
                "pickled: copy the optimizer before closing it"
            )
        try:
            pending = self.state_dict()
        except RootWorkerError as exc:
            raise RuntimeError(f"BackgroundRoots cannot be copied or pickled: {exc}") from exc
        return {"config": self._config, "pending": pending, "last_step": self._last_step}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["config"])  # type: ignore[misc]  # its own threads or processes
        self.load_state_dict(state["pending"])
        self._last_step = state["last_step"]

    # ------------------------------------------------------------------ helpers
    def _submit(self, step: int, jobs: list[RootJob]) -> None:
        devices = {j.key: j.matrix.device for j in jobs}
        cuda = any(d.type == "cuda" for d in devices.values())
        event, stream = None, None
        if not cuda:
            snaps = [replace(j, matrix=j.matrix.clone()) for j in jobs]
        elif self._stream is not None:  # snapshot and roots on the side stream
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                snaps = [replace(j, matrix=j.matrix.clone()) for j in jobs]
        else:  # non_blocking copies into pinned host memory; the worker waits for the event
            snaps = []
            for j in jobs:
                buf = torch.empty(j.matrix.shape, dtype=j.matrix.dtype, pin_memory=True)
                snaps.append(replace(j, matrix=buf.copy_(j.matrix, non_blocking=True)))
            event = torch.cuda.Event()
            event.record()
        future: Future[list[RootOutcome]] = Future()
        apply = step + (self.delay if self.mode == "deterministic" else self.max_staleness)
        self._pending.append(_Entry(step, apply, [j.key for j in jobs], devices, future, snaps, stream))
        self._tasks.put((future, snaps, event, cuda and stream is None))

    def _result(self, e: _Entry) -> list[RootOutcome]:
        """Wait for an entry; on a worker error or a timeout raise, or fall back to inline."""
        try:
            return e.future.result(timeout=self.timeout)
        except BaseException as exc:  # noqa: B036
            hung = not e.future.done()
            if hung:
                err: RootWorkerError = RootTimeoutError(
                    f"background root computation for {e.describe()} was not done after {self.timeout} s "
                    f"(at step {self._last_step}): the worker may be hung"
                )
            else:
                err = RootWorkerError(
                    f"background root computation for {e.describe()} failed: {type(exc).__name__}: {exc}"
                )
            if self.on_error == "inline" and e.snapshot:
                warnings.warn(f"{err}; computing these roots inline instead", RuntimeWarning, stacklevel=4)
                e.future.cancel()
                return compute_roots([replace(j, matrix=j.matrix.to(e.devices[j.key])) for j in e.snapshot])
            raise err from (None if hung else exc)

    def _install_ready(self, e: _Entry) -> list[RootOutcome]:
        outs = self._result(e)
        if e.stream is not None:  # the training stream waits for the side stream, and owns the roots
            current = torch.cuda.current_stream()
            current.wait_stream(e.stream)
            for o in outs:
                o.root.record_stream(current)
        return _to_devices(outs, e.devices)
