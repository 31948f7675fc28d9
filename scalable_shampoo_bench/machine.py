"""What ran a benchmark and how busy the machine was: the one place that reads ``/proc``.

- :class:`CpuLoad` measures, between ``start()`` and ``stop()``, the whole machine's
  CPU use (``/proc/stat``), this process's own CPU time (every thread), and from the
  two the cores' worth that *other* processes used; :class:`CpuMonitor` is the same
  measurement in the short form ``shampoo-bench``'s summaries record.
- :func:`cpu_name`, :func:`library_fingerprint`, :func:`source_info` and
  :func:`describe` say what the result was measured on and with which library code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux
    resource = None  # type: ignore[assignment]


class ProcStat(NamedTuple):
    """The first line of ``/proc/stat`` in jiffies, and the number of ``cpuN`` lines."""

    total: int  # user nice system idle iowait irq softirq steal (guest time is inside user)
    idle: int  # idle + iowait
    steal: int  # taken by the hypervisor
    cpus: int


def proc_stat() -> ProcStat | None:
    """The machine's CPU counters now, or None where there is no ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:9]]
    fields += [0] * (8 - len(fields))
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return ProcStat(sum(fields), fields[3] + fields[4], fields[7], cpus)


def clock_ticks() -> int:
    """Jiffies per second, the unit of ``/proc/stat`` and ``/proc/PID/stat``."""
    return os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds (user + system) used so far by every thread of this process."""
    if resource is not None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    return time.process_time()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (another one, e.g. a worker); 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / clock_ticks()
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuLoad:
    """CPU use of the whole machine and of other processes between ``start()`` and ``stop()``.

    ``extra_own`` (passed to :meth:`stop`) adds CPU seconds spent on this process's
    behalf elsewhere, e.g. by worker processes, so that they do not count as others'.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._t = time.perf_counter()
        self._stat = proc_stat()
        self._own = own_cpu_s()

    def stop(self, extra_own: float = 0.0) -> dict[str, Any]:
        wall = time.perf_counter() - self._t
        own = own_cpu_s() - self._own + extra_own
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
        end = proc_stat()
        if self._stat is None or end is None:
            return out
        hz = clock_ticks()
        total = (end.total - self._stat.total) / hz
        idle = (end.idle - self._stat.idle) / hz
        steal = (end.steal - self._stat.steal) / hz
        if total <= 0:
            return out
        busy = total - idle - steal
        other = max(0.0, busy - own)
        out.update(
            machine_cpus=end.cpus,
            machine_busy_fraction=round(busy / total, 4),
            other_busy_fraction=round(other / total, 4),  # share of all CPUs used by other processes
            other_cores=round(other / wall, 3) if wall > 0 else None,  # cores' worth used by others
            steal_fraction=round(steal / total, 4),
        )
        return out


class CpuMonitor(CpuLoad):
    """:class:`CpuLoad` in short: wall seconds, and the cores' worth used by this process and by others."""

    def stop(self, extra_own: float = 0.0) -> dict[str, Any]:
        load = super().stop(extra_own)
        wall, own, other = load["wall_s"], load["own_cpu_s"], load["other_cores"]
        return {
            "wall_s": round(wall, 1),
            "own_cores": round(own / wall, 2) if wall > 0 else None,
            "other_cores": None if other is None else round(other, 2),
        }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_dir() -> Path | None:
    spec = importlib.util.find_spec("scalable_shampoo")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _library_digest() -> str | None:
    """SHA-256 of scalable_shampoo's source files as imported (names and contents), hex."""
    pkg = _library_dir()
    if pkg is None:
        return None
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def library_fingerprint() -> str:
    """A short hash of scalable_shampoo's source files, so a result can be tied to the code that made it."""
    digest = _library_digest()
    return "unknown" if digest is None else digest[:12]


def source_info() -> dict[str, Any]:
    """The library's source hash, and the git commit it was imported from and whether that tree is dirty.

    No paths of this machine are recorded.
    """
    digest = _library_digest()
    info: dict[str, Any] = {"sources_sha256": None if digest is None else digest[:16]}
    pkg = _library_dir()
    try:
        if pkg is None:
            raise OSError("scalable_shampoo is not importable")

        def git(*cmd: str) -> str:
            return subprocess.run(
                ["git", *cmd], cwd=pkg, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        info["commit"] = git("rev-parse", "HEAD")
        info["src_dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def describe(device: torch.device, threads: int) -> dict[str, Any]:
    import scalable_shampoo

    return {
        "torch": torch.__version__,
        "scalable_shampoo": scalable_shampoo.__version__,
        "library_sha256": library_fingerprint(),
        "python": platform.python_version(),
        "device": device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "threads": threads,
        "cpus": os.cpu_count(),
    }
