"""Shampoo's optimizer-step time against AdamW, the cost of one root, and the FLOP bound.

Four measurements, all in one run and on one machine, written to one JSON file:

1. **Step time** (``step_time``): the optimizer step alone, on fixed random
   gradients (``p.grad`` is set once from a seeded generator and re-used), for
   Shampoo and ``torch.optim.AdamW(foreach=True)`` on two copies of the same model.
   The two are interleaved in chunks (A B B A A B …) over ``--periods`` full
   ``precondition_frequency`` periods, so root recomputation is inside the window
   exactly ``--periods`` times. Median, mean (amortized) and max step; the max is
   the root spike.
2. **End to end** (``end_to_end``): forward + backward + step of the Transformer
   on a fixed batch, Shampoo against AdamW, interleaved the same way.
3. **Roots** (``roots``): one inverse 4th root by eigh and by coupled Newton at
   several sizes, through ``inverse_root`` (which adds λ_max, the residual check
   and retries) and through the raw ``eigh_inverse_root`` /
   ``coupled_newton_inverse_root``; median of repeats, methods interleaved.
4. **FLOP bound** (``flop_bound``): the matmul FLOPs of one step's statistics
   (``G Gᵀ``, ``Gᵀ G``) and preconditioning (``L^(-1/p) G R^(-1/p)``), divided by
   the GEMM rate measured in the same run (a 1024×1024 fp32 matmul).

The thread count is set explicitly (``--threads``) and recorded, with the torch
version, the device, and the CPU time that other processes used during each
measurement (from ``/proc/stat`` deltas minus this process's own CPU time; null
where ``/proc/stat`` does not exist). See ``/work/shared/BENCHMARKS.md`` for why.

Run ``python -m benchmarks.step_time --help``; ``--quick`` is a smoke test of a few seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from scalable_shampoo import Shampoo
from scalable_shampoo.matrix_roots import (
    coupled_newton_inverse_root,
    eigh_inverse_root,
    inverse_root,
    max_eigenvalue,
    root_residual,
)

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux
    resource = None  # type: ignore[assignment]

__all__ = ["main"]

MODELS = ("linear4", "transformer")
ROOT_P = 4


# ---------------------------------------------------------------------------------------------- machine load
def _proc_stat() -> tuple[int, int, int, int] | None:
    """(total, idle + iowait, steal, number of cpuN lines) in jiffies, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    fields += [0] * (8 - len(fields))
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return total, fields[3] + fields[4], fields[7], ncpu


def _own_cpu_s() -> float:
    if resource is not None:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return r.ru_utime + r.ru_stime
    return time.process_time()


class CpuLoad:
    """CPU use of the whole machine and of other processes between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._t = time.perf_counter()
        self._stat = _proc_stat()
        self._own = _own_cpu_s()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t
        own = _own_cpu_s() - self._own
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "own_cpu_s": round(own, 3),
            "own_cores": round(own / wall, 3) if wall > 0 else None,
            "machine_cpus": None,
            "machine_busy_fraction": None,
            "other_busy_fraction": None,
            "other_cores": None,
            "steal_fraction": None,
        }
        end = _proc_stat()
        if self._stat is None or end is None:
            return out
        hz = os.sysconf("SC_CLK_TCK")
        total = (end[0] - self._stat[0]) / hz
        idle = (end[1] - self._stat[1]) / hz
        steal = (end[2] - self._stat[2]) / hz
        if total <= 0:
            return out
        busy = total - idle - steal
        other = max(0.0, busy - own)
        out.update(
            machine_cpus=end[3],
            machine_busy_fraction=round(busy / total, 4),
            other_busy_fraction=round(other / total, 4),  # share of all CPUs used by other processes
            other_cores=round(other / wall, 3) if wall > 0 else None,  # cores' worth used by others
            steal_fraction=round(steal / total, 4),  # taken by the hypervisor
        )
        return out


@contextmanager
def measured_load(record: dict[str, Any]) -> Iterator[None]:
    load = CpuLoad()
    try:
        yield
    finally:
        record["load"] = load.stop()


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def interleave(
    run_a: Callable[[], object], run_b: Callable[[], object], n: int, chunk: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """``n`` timed calls of each, in chunks A B B A A B …; the seconds of every call, in order."""
    ta: list[float] = []
    tb: list[float] = []
    done, i = 0, 0
    while done < n:
        k = min(chunk, n - done)
        order = [(run_a, ta), (run_b, tb)] if i % 2 == 0 else [(run_b, tb), (run_a, ta)]
        for fn, out in order:
            for _ in range(k):
                out.append(_timed(fn, device))
        done, i = done + k, i + 1
    return ta, tb


def _ms(x: float) -> float:
    return round(1e3 * x, 4)


def summarize(times: Sequence[float], spikes: Sequence[bool] | None = None) -> dict[str, Any]:
    """Median / mean / max in ms; with ``spikes`` (root steps), also the root and non-root medians."""
    s = sorted(times)
    out: dict[str, Any] = {
        "steps": len(times),
        "median_ms": _ms(statistics.median(s)),
        "mean_ms": _ms(statistics.fmean(s)),
        "max_ms": _ms(s[-1]),
        "min_ms": _ms(s[0]),
        "p90_ms": _ms(s[min(len(s) - 1, int(0.9 * len(s)))]),
        "total_s": round(sum(s), 4),
    }
    if spikes is not None:
        root = [t for t, r in zip(times, spikes, strict=True) if r]
        rest = [t for t, r in zip(times, spikes, strict=True) if not r]
        out["root_steps"] = len(root)
        out["root_step_median_ms"] = _ms(statistics.median(root)) if root else None
        out["nonroot_median_ms"] = _ms(statistics.median(rest)) if rest else None
        out["nonroot_mean_ms"] = _ms(statistics.fmean(rest)) if rest else None
    return out


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {f"ratio_{k}": round(a[f"{k}_ms"] / b[f"{k}_ms"], 3) for k in ("median", "mean", "max")}


# ---------------------------------------------------------------------------------------------- models
def model_dims(name: str, quick: bool) -> dict[str, int]:
    if name == "linear4":
        return {"d": 64 if quick else 1024, "layers": 4}
    if name == "transformer":
        if quick:
            return {"d": 32, "layers": 1, "heads": 2, "ff": 64}
        return {"d": 256, "layers": 4, "heads": 4, "ff": 1024}
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_model(name: str, quick: bool, device: torch.device, seed: int = 0) -> nn.Module:
    dims = model_dims(name, quick)
    torch.manual_seed(seed)
    model: nn.Module
    if name == "linear4":
        model = nn.Sequential(*[nn.Linear(dims["d"], dims["d"]) for _ in range(dims["layers"])])
    else:
        layer = nn.TransformerEncoderLayer(
            dims["d"], dims["heads"], dims["ff"], dropout=0.0, batch_first=True
        )
        model = nn.TransformerEncoder(layer, dims["layers"], enable_nested_tensor=False)
    return model.to(device)


def set_fixed_grads(model: nn.Module, seed: int) -> None:
    """``p.grad`` from a seeded generator, the same for every copy of the model; set once, re-used."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device=p.device, dtype=p.dtype)


def make_shampoo(model: nn.Module, block_size: int, frequency: int, start: int) -> Shampoo:
    return Shampoo(
        model.parameters(),
        lr=1e-3,
        weight_decay=1e-2,
        block_size=block_size,
        precondition_frequency=frequency,
        start_preconditioning_step=start,
    )


def make_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)


def root_counts(opt: Shampoo) -> dict[str, int]:
    """Roots installed and rejected so far, from the optimizer's state."""
    installed = rejected = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key.startswith("root."):
                installed += 1
            elif key.startswith("root_info."):
                rejected += int(value[4])
    return {"root_matrices": installed, "roots_rejected": rejected}


def step_flops(model: nn.Module, opt: Shampoo) -> float:
    """Matmul FLOPs of one step's statistics and preconditioning, over every preconditioned block.

    A block with ``N`` entries and a statistic on axis ``a`` (length ``n_a``) costs
    ``2·N·n_a`` for ``G₍ₐ₎G₍ₐ₎ᵀ`` and ``2·N·n_a`` for contracting G with the root:
    ``4·N·Σₐ n_a`` (for an m×n matrix, ``4mn(m + n)``).
    """
    group = opt.param_groups[0]
    flops = 0.0
    for p in model.parameters():
        for block in opt.plan(p, group).blocks:
            numel = 1
            for n in block.shape:
                numel *= n
            flops += 4.0 * numel * sum(block.shape[a] for a in block.axes)
    return flops


def _is_root_step(step: int, start: int, frequency: int) -> bool:
    return step >= start and (step - start) % frequency == 0


# ---------------------------------------------------------------------------------------------- 1. step time
def bench_step_time(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    set_fixed_grads(model_a, seed=1)
    set_fixed_grads(model_b, seed=1)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step)
    adamw = make_adamw(model_b)
    n = args.periods * frequency
    warmup = args.warmup
    record: dict[str, Any] = {
        "model": name,
        "dims": model_dims(name, args.quick),
        "params": sum(p.numel() for p in model_a.parameters()),
        "block_size": block_size,
        "precondition_frequency": frequency,
        "start_preconditioning_step": args.start_step,
        "warmup_steps": warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    with measured_load(record):
        for _ in range(warmup):  # untimed: state allocation, the first roots
            shampoo.step()
            adamw.step()
        first = shampoo.global_step + 1
        ta, tb = interleave(shampoo.step, adamw.step, n, args.chunk, device)
    spikes = [_is_root_step(s, args.start_step, frequency) for s in range(first, first + n)]
    record["shampoo"] = summarize(ta, spikes)
    record["adamw"] = summarize(tb)
    record.update(_ratios(record["shampoo"], record["adamw"]))
    record.update(root_counts(shampoo))
    record["step_gflop"] = round(step_flops(model_a, shampoo) / 1e9, 4)
    record["raw_ms"] = {"shampoo": [_ms(t) for t in ta], "adamw": [_ms(t) for t in tb], "first_shampoo_step": first}
    if args.profile:
        record["profile"] = profile_steps(shampoo, device, args.profile_steps, args.start_step, frequency)
    return record


def _top_ops(prof: Any, steps: int, top: int = 12) -> dict[str, Any]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    steps = max(steps, 1)
    rows = [
        {
            "op": e.key,
            "calls_per_step": round(e.count / steps, 2),
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "self_share": round(e.self_cpu_time_total / total_self, 4),
        }
        for e in events[:top]
    ]
    return {
        "steps": steps,
        "self_ms_per_step_total": round(total_self / 1e3 / steps, 3),
        "ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "top_ops": rows,
    }


def profile_steps(
    opt: Shampoo, device: torch.device, steps: int, start: int, frequency: int
) -> dict[str, Any]:
    """The top ops by self time over ``steps`` non-root Shampoo steps, then over one root step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    while _is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    done = 0
    with profile(activities=activities) as prof:
        while done < steps and not _is_root_step(opt.global_step + 1, start, frequency):
            opt.step()
            done += 1
    _sync(device)
    out = _top_ops(prof, done)
    while not _is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    with profile(activities=activities) as prof:
        opt.step()
    _sync(device)
    out["root_step"] = _top_ops(prof, 1)
    return out


# ---------------------------------------------------------------------------------------------- 2. end to end
def bench_end_to_end(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    d = model_dims(name, args.quick)["d"]
    gen = torch.Generator().manual_seed(2)
    shape = (args.e2e_batch, args.e2e_seq, d) if name == "transformer" else (args.e2e_batch * args.e2e_seq, d)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randn(shape, generator=gen).to(device)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step)
    adamw = make_adamw(model_b)

    def iteration(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()

        return run

    run_a, run_b = iteration(model_a, shampoo), iteration(model_b, adamw)
    n = args.periods * frequency
    record: dict[str, Any] = {
        "model": name,
        "batch": list(shape[:-1]),
        "block_size": block_size,
        "precondition_frequency": frequency,
        "start_preconditioning_step": args.start_step,
        "warmup_steps": args.warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    with measured_load(record):
        for _ in range(args.warmup):
            run_a()
            run_b()
        first = shampoo.global_step + 1
        ta, tb = interleave(run_a, run_b, n, args.chunk, device)
    spikes = [_is_root_step(s, args.start_step, frequency) for s in range(first, first + n)]
    record["shampoo"] = summarize(ta, spikes)
    record["adamw"] = summarize(tb)
    record.update(_ratios(record["shampoo"], record["adamw"]))
    record.update(root_counts(shampoo))
    record["raw_ms"] = {"shampoo": [_ms(t) for t in ta], "adamw": [_ms(t) for t in tb], "first_shampoo_step": first}
    return record


# ---------------------------------------------------------------------------------------------- 3. roots
def spd_matrix(n: int, spectrum: str, device: torch.device, seed: int = 3) -> Tensor:
    """``G Gᵀ/m`` plus a small ridge (1e-6 of the mean eigenvalue), fp32.

    ``square``: G is n×n, so the spectrum is Marchenko–Pastur at ratio 1, reaching
    down to ~0 (condition number ~1e6 after the ridge), like a young statistic.
    ``tall``: G is n×4n, a well-conditioned statistic (condition number ~9).
    """
    m = {"square": n, "tall": 4 * n}[spectrum]
    gen = torch.Generator().manual_seed(seed + n)
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    a = g @ g.T / m
    a += 1e-6 * a.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    return a.to(device=device, dtype=torch.float32)


class _MatmulCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.matmul, Tensor.__matmul__, Tensor.matmul, torch.mm, torch.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def newton_iterations(a_damped: Tensor) -> int:
    """Iterations coupled Newton takes on ``a_damped`` (p=4: four matmuls per iteration)."""
    with _MatmulCounter() as counter:
        coupled_newton_inverse_root(a_damped, ROOT_P)
    return counter.count // 4


def bench_roots(
    sizes: Sequence[int], spectra: Sequence[str], threads: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    out = []
    for spectrum in spectra:
        for n in sizes:
            a = spd_matrix(n, spectrum, device)
            lam = max_eigenvalue(a)
            eps = 1e-6 * lam  # inverse_root's default: ε relative to λ_max
            a_d = a + eps * torch.eye(n, device=device)
            fns: dict[str, Callable[[], object]] = {
                "eigh": lambda a=a: inverse_root(a, ROOT_P, method="eigh"),
                "newton": lambda a=a: inverse_root(a, ROOT_P, method="newton"),
                "eigh_raw": lambda a_d=a_d, eps=eps: eigh_inverse_root(a_d, ROOT_P, eps),
                "newton_raw": lambda a_d=a_d: coupled_newton_inverse_root(a_d, ROOT_P),
            }
            record: dict[str, Any] = {"n": n, "p": ROOT_P, "spectrum": spectrum, "threads": threads}
            times: dict[str, list[float]] = {k: [] for k in fns}
            with measured_load(record):
                for fn in fns.values():  # warm-up
                    fn()
                for _ in range(repeats):  # interleaved repeats
                    for k, fn in fns.items():
                        times[k].append(_timed(fn, device))
            for k, ts in times.items():
                record[k] = {"median_ms": _ms(statistics.median(ts)), "min_ms": _ms(min(ts)), "repeats": len(ts)}
            record["newton_over_eigh"] = round(record["newton"]["median_ms"] / record["eigh"]["median_ms"], 3)
            r_eigh = eigh_inverse_root(a_d, ROOT_P, eps)
            r_newton = coupled_newton_inverse_root(a_d, ROOT_P)
            record["residual_eigh"] = float(root_residual(r_eigh.double(), a_d.double(), ROOT_P))
            record["residual_newton"] = float(root_residual(r_newton.double(), a_d.double(), ROOT_P))
            record["eigh_vs_newton_rel_diff"] = float((r_eigh - r_newton).norm() / r_eigh.norm())
            record["newton_iterations"] = newton_iterations(a_d)
            eig = torch.linalg.eigvalsh(a_d.double())
            record["condition_number"] = float(eig[-1] / eig[0].clamp_min(1e-300))
            out.append(record)
    return out


# ---------------------------------------------------------------------------------------------- 4. GEMM rate
def gemm_rate(n: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """GFLOP/s of an n×n fp32 matmul (2n³ FLOPs), median of ``repeats``."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    ts = [_timed(lambda: torch.matmul(a, b, out=out), device) for _ in range(repeats)]
    med = statistics.median(ts)
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "median_ms": _ms(med),
        "gflops": round(2.0 * n**3 / med / 1e9, 2),
        "best_gflops": round(2.0 * n**3 / min(ts) / 1e9, 2),
    }


def flop_bounds(steps: list[dict[str, Any]], gemm: dict[int, dict[str, Any]], ref_n: int) -> list[dict[str, Any]]:
    """Measured Shampoo step against matmul FLOPs ÷ the measured GEMM rate."""
    out = []
    for r in steps:
        gflop = r["step_gflop"]
        rate = gemm[ref_n]["gflops"]
        bound_ms = 1e3 * gflop / rate
        block_n = min(gemm, key=lambda k: abs(k - r["block_size"]))  # GEMM rate at the block's size
        bound_block_ms = 1e3 * gflop / gemm[block_n]["gflops"]
        sh = r["shampoo"]
        out.append(
            {
                "model": r["model"],
                "block_size": r["block_size"],
                "precondition_frequency": r["precondition_frequency"],
                "step_gflop": gflop,
                "gemm_n": ref_n,
                "gemm_gflops": rate,
                "bound_ms": round(bound_ms, 3),
                "gemm_n_at_block": block_n,
                "bound_ms_at_block_gemm": round(bound_block_ms, 3),
                "shampoo_nonroot_median_ms": sh["nonroot_median_ms"],
                "shampoo_mean_ms": sh["mean_ms"],
                "adamw_median_ms": r["adamw"]["median_ms"],
                "nonroot_median_over_bound": round(sh["nonroot_median_ms"] / bound_ms, 3),
                "mean_over_bound": round(sh["mean_ms"] / bound_ms, 3),
                "achieved_gflops_nonroot": round(gflop / (sh["nonroot_median_ms"] / 1e3), 2),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- report
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return "-" if x is None else str(x)


def _load_str(load: dict[str, Any]) -> str:
    if load.get("other_cores") is None:
        return "n/a"
    return f"{load['other_cores']:.2f}"


def report(res: dict[str, Any]) -> str:
    m = res["meta"]
    parts = [
        f"torch {m['torch']}  device {m['device']} ({m['device_name']})  threads {m['threads']}  "
        f"cpus {m['cpu_count']}  {'QUICK ' if m['quick'] else ''}wall {m.get('wall_s', 0):.1f}s  "
        f"other processes: {_load_str(res['load'])} cores on average "
        f"(machine busy {res['load'].get('machine_busy_fraction')})"
    ]
    step_headers = [
        "model", "block", "freq", "sh med", "sh mean", "sh max", "sh root", "aw med", "aw mean", "aw max",
        "x med", "x mean", "x max", "others",
    ]  # fmt: skip

    def step_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
        return [
            [
                r["model"], r["block_size"], r["precondition_frequency"],
                r["shampoo"]["median_ms"], r["shampoo"]["mean_ms"], r["shampoo"]["max_ms"],
                r["shampoo"]["root_step_median_ms"], r["adamw"]["median_ms"], r["adamw"]["mean_ms"],
                r["adamw"]["max_ms"], r["ratio_median"], r["ratio_mean"], r["ratio_max"], _load_str(r["load"]),
            ]
            for r in records
        ]  # fmt: skip

    if res.get("step_time"):
        parts += ["", "Optimizer step only (ms; x = Shampoo/AdamW; others = cores used by other processes)"]
        parts.append(_table(step_headers, step_rows(res["step_time"])))
    if res.get("end_to_end"):
        parts += ["", "End to end: forward + backward + step (ms)"]
        parts.append(_table(step_headers, step_rows(res["end_to_end"])))
    if res.get("roots"):
        parts += ["", f"One inverse {ROOT_P}th root, fp32 (median ms; eigh/newton via inverse_root, *_raw bare)"]
        rows = [
            [
                r["spectrum"], r["n"], r["threads"], r["eigh"]["median_ms"], r["newton"]["median_ms"],
                r["newton_over_eigh"], r["eigh_raw"]["median_ms"], r["newton_raw"]["median_ms"],
                r["newton_iterations"], f"{r['condition_number']:.1e}", f"{r['residual_eigh']:.1e}",
                f"{r['residual_newton']:.1e}", _load_str(r["load"]),
            ]
            for r in res["roots"]
        ]  # fmt: skip
        headers = [
            "spectrum", "n", "thr", "eigh", "newton", "newton/eigh", "eigh_raw", "newton_raw", "iters", "cond",
            "res eigh", "res newton", "others",
        ]  # fmt: skip
        parts.append(_table(headers, rows))
    if res.get("gemm"):
        rates = ", ".join(f"n={g['n']}: {g['gflops']}" for g in res["gemm"])
        parts += ["", f"GEMM fp32 GFLOP/s ({res['gemm'][0]['threads']} threads): {rates}"]
    if res.get("flop_bound"):
        parts += ["", "FLOP bound of the Shampoo step (statistics + preconditioning matmuls ÷ GEMM rate)"]
        rows = [
            [
                r["model"], r["block_size"], r["step_gflop"], r["gemm_gflops"], r["bound_ms"],
                r["bound_ms_at_block_gemm"], r["shampoo_nonroot_median_ms"], r["nonroot_median_over_bound"],
                r["shampoo_mean_ms"], r["mean_over_bound"], r["achieved_gflops_nonroot"],
            ]
            for r in res["flop_bound"]
        ]  # fmt: skip
        headers = [
            "model", "block", "GFLOP/step", "GEMM GF/s", "bound ms", "bound@block", "nonroot med", "x bound",
            "mean", "x bound", "achieved GF/s",
        ]  # fmt: skip
        parts.append(_table(headers, rows))
    for r in res.get("step_time", []):
        if "profile" in r:
            prof = r["profile"]
            parts += [
                "",
                f"Profile {r['model']} block {r['block_size']}: {prof['steps']} non-root steps, "
                f"{prof['self_ms_per_step_total']} ms self CPU/step, {prof['ops_per_step']} ops/step",
            ]
            rows = [[o["op"], o["calls_per_step"], o["self_ms_per_step"], o["self_share"]] for o in prof["top_ops"]]
            parts.append(_table(["op", "calls/step", "self ms/step", "share"], rows))
            root = prof["root_step"]
            parts.append(f"  one root step: {root['self_ms_per_step_total']} ms self CPU, top ops:")
            rows = [[o["op"], o["calls_per_step"], o["self_ms_per_step"], o["self_share"]] for o in root["top_ops"][:8]]
            parts.append(_table(["op", "calls", "self ms", "share"], rows))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shampoo-bench step-time",
        description="Shampoo vs AdamW optimizer-step time (interleaved), root cost, FLOP bound.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything but --root-threads")
    p.add_argument("--out", default="step_time.json", help="JSON output file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    p.add_argument("--models", type=_names, default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--block-sizes", type=_ints, default=None, help="comma list (default 256,1024)")
    p.add_argument("--frequencies", type=_ints, default=None, help="precondition_frequency list (default 100)")
    p.add_argument("--start-step", type=int, default=1, help="start_preconditioning_step (default 1)")
    p.add_argument("--periods", type=int, default=2, help="measured precondition_frequency periods (≥ 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring (default 3)")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved chunk (default 10)")
    p.add_argument("--e2e-models", type=_names, default=None, help="end-to-end models (default transformer)")
    p.add_argument("--e2e-batch", type=int, default=None, help="end-to-end batch (default 8)")
    p.add_argument("--e2e-seq", type=int, default=None, help="end-to-end sequence length (default 64)")
    p.add_argument("--root-sizes", type=_ints, default=None, help="root matrix sizes (default 256,512,1024)")
    p.add_argument("--root-spectra", type=_names, default=["square", "tall"], help="square (ill-), tall (well-cond.)")
    p.add_argument("--root-threads", type=_ints, default=None, help="thread counts for root timing (default --threads)")
    p.add_argument("--root-repeats", type=int, default=None, help="repeats per root timing (default 5)")
    p.add_argument("--gemm-sizes", type=_ints, default=None, help="GEMM sizes (default 256,512,1024)")
    p.add_argument("--sections", type=_names, default=["steps", "e2e", "roots", "flops"], help="what to run")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of non-root Shampoo steps")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "models": list(MODELS),
        "block_sizes": [16, 64] if q else [256, 1024],
        "frequencies": [4] if q else [100],
        "warmup": 2 if q else 3,
        "chunk": 3 if q else 10,
        "e2e_models": ["transformer"],
        "e2e_batch": 2 if q else 8,
        "e2e_seq": 8 if q else 64,
        "root_sizes": [16, 32] if q else [256, 512, 1024],
        "root_threads": [args.threads],
        "root_repeats": 2 if q else 5,
        "gemm_sizes": [32, 64] if q else [256, 512, 1024],
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.periods < 1 or args.warmup < 1 or args.chunk < 1:
        p.error("--periods, --warmup and --chunk must be ≥ 1")
    for m in args.models + args.e2e_models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    unknown = set(args.sections) - {"steps", "e2e", "roots", "flops"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {
            "benchmark": "step_time",
            "argv": sys.argv[1:] if argv is None else list(argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "root_threads": args.root_threads,
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
            "mkl": torch.backends.mkl.is_available(),
            "quick": args.quick,
            "source": _source_info(),
            "note": args.note,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        },
    }
    whole = CpuLoad()
    sections = set(args.sections)
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)

    def save(complete: bool = False) -> None:  # after every measurement, so a cut-short run keeps its results
        res["meta"]["complete"] = complete
        out.write_text(json.dumps(res, indent=1) + "\n")

    if "flops" in sections:
        res["gemm"] = [gemm_rate(n, device, 5 if args.quick else 20) for n in args.gemm_sizes]
    if "steps" in sections:
        res["step_time"] = []
        for m in args.models:
            for bs in args.block_sizes:
                for f in args.frequencies:
                    res["step_time"].append(bench_step_time(m, bs, f, args, device))
                    save()
    if "e2e" in sections:
        res["end_to_end"] = []
        for m in args.e2e_models:
            for bs in args.block_sizes:
                for f in args.frequencies:
                    res["end_to_end"].append(bench_end_to_end(m, bs, f, args, device))
                    save()
    if "roots" in sections:
        res["roots"] = []
        for threads in args.root_threads:
            torch.set_num_threads(threads)
            res["roots"] += bench_roots(args.root_sizes, args.root_spectra, threads, args.root_repeats, device)
            save()
        torch.set_num_threads(args.threads)
    if "flops" in sections:
        # the rate again at the end, so a change of load during the run shows
        res["gemm_end"] = [gemm_rate(n, device, 5 if args.quick else 20) for n in args.gemm_sizes]
        if res.get("step_time"):
            gemm = {g["n"]: g for g in res["gemm"]}
            ref = 1024 if 1024 in gemm else max(gemm)
            res["flop_bound"] = flop_bounds(res["step_time"], gemm, ref)

    res["load"] = whole.stop()
    res["meta"]["wall_s"] = round(time.perf_counter() - t0, 2)
    res["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save(complete=True)
    print(report(res))
    print(f"\nwrote {out}")
    return 0


def _source_info() -> dict[str, Any]:
    """The commit and a hash of the scalable_shampoo sources actually imported (the tree may be dirty)."""
    import hashlib
    import subprocess

    import scalable_shampoo

    pkg = Path(scalable_shampoo.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    info: dict[str, Any] = {"package_dir": str(pkg), "sources_sha256": digest.hexdigest()[:16]}
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(
                ["git", *cmd], cwd=pkg, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        info["commit"] = git("rev-parse", "HEAD")
        info["src_dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
