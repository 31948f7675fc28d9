"""Timing: two step functions interleaved in chunks, summaries of the times, and the load during a measurement."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..machine import CpuLoad


@contextmanager
def measured_load(record: dict[str, Any]) -> Iterator[None]:
    """Store in ``record["load"]`` how busy the machine was, and with what, during the block."""
    load = CpuLoad()
    try:
        yield
    finally:
        record["load"] = load.stop()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, device work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
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
                out.append(timed(fn, device))
        done, i = done + k, i + 1
    return ta, tb


def ms(x: float) -> float:
    return round(1e3 * x, 4)


def is_root_step(step: int, start: int, frequency: int) -> bool:
    """Whether Shampoo recomputes its roots at ``step``."""
    return step >= start and (step - start) % frequency == 0


def summarize(times: Sequence[float], spikes: Sequence[bool] | None = None) -> dict[str, Any]:
    """Median / mean / max in ms; with ``spikes`` (root steps), also the root and non-root medians."""
    s = sorted(times)
    out: dict[str, Any] = {
        "steps": len(times),
        "median_ms": ms(statistics.median(s)),
        "mean_ms": ms(statistics.fmean(s)),
        "max_ms": ms(s[-1]),
        "min_ms": ms(s[0]),
        "p90_ms": ms(s[min(len(s) - 1, int(0.9 * len(s)))]),
        "total_s": round(sum(s), 4),
    }
    if spikes is not None:
        root = [t for t, r in zip(times, spikes, strict=True) if r]
        rest = [t for t, r in zip(times, spikes, strict=True) if not r]
        out["root_steps"] = len(root)
        out["root_step_median_ms"] = ms(statistics.median(root)) if root else None
        out["nonroot_median_ms"] = ms(statistics.median(rest)) if rest else None
        out["nonroot_mean_ms"] = ms(statistics.fmean(rest)) if rest else None
    return out


def ratio_dict(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a/b of the median, mean and max of two :func:`summarize` results."""
    return {k: round(a[f"{k}_ms"] / b[f"{k}_ms"], 3) for k in ("median", "mean", "max")}


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {f"ratio_{k}": v for k, v in ratio_dict(a, b).items()}


def timed_pair(
    run_a: Callable[[], object],
    run_b: Callable[[], object],
    warmup: int,
    n: int,
    chunk: int,
    device: torch.device,
    record: dict[str, Any],
    first_step: Callable[[], int],
) -> tuple[list[float], list[float], int]:
    """``warmup`` untimed calls of each, then :func:`interleave`, with the load stored in ``record``.

    Returns both lists of seconds and ``first_step()`` as read after the warm-up (the
    optimizer step that the first timed call made).
    """
    with measured_load(record):
        for _ in range(warmup):  # untimed: state allocation, the first roots
            run_a()
            run_b()
        first = first_step()
        ta, tb = interleave(run_a, run_b, n, chunk, device)
    return ta, tb, first
