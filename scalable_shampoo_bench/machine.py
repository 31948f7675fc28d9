"""What ran the benchmark: versions, CPU, threads, and how busy other processes kept the machine."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def _proc_stat() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together, or None where there is no /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    fields = [int(x) for x in first[1:9]] + [0] * 8
    total = sum(fields[:8])
    idle = fields[3] + fields[4] + fields[7]  # idle, iowait, steal
    return total - idle, total


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuMonitor:
    """How many cores' worth of CPU other processes used between construction and :meth:`stop`."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.stat = _proc_stat()
        self.own = _own_cpu()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.wall
        own = _own_cpu() - self.own
        end = _proc_stat()
        other = None
        if self.stat is not None and end is not None and wall > 0:
            busy = (end[0] - self.stat[0]) / os.sysconf("SC_CLK_TCK")
            other = round(max(0.0, busy - own) / wall, 2)
        return {"wall_s": round(wall, 1), "own_cores": round(own / wall, 2) if wall > 0 else None, "other_cores": other}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_fingerprint() -> str:
    """A short hash of scalable_shampoo's source files, so a result can be tied to the code that made it."""
    spec = importlib.util.find_spec("scalable_shampoo")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def describe(device: torch.device, threads: int) -> dict[str, Any]:
    import scalable_shampoo

    return {
        "torch": torch.__version__,
        "scalable_shampoo": scalable_shampoo.__version__,
        "library_sha256": library_fingerprint(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "threads": threads,
        "cpus": os.cpu_count(),
    }
