"""scalable_shampoo_bench/machine.py, the benchmarks' one reader of /proc, and the step-time command line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalable_shampoo_bench import machine

HAS_PROC = Path("/proc/stat").exists()


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_load_counts_this_process_busy_work() -> None:
    load = machine.CpuLoad()
    _spin(0.3)
    out = load.stop()
    assert out["own_cpu_s"] >= 0.29 and out["wall_s"] >= out["own_cpu_s"] - 0.05
    assert 0 < out["own_cores"] <= 1.05  # one thread spun
    if HAS_PROC:
        assert out["machine_cpus"] >= 1 and 0 < out["machine_busy_fraction"] <= 1
        assert out["other_cores"] >= 0 and 0 <= out["other_busy_fraction"] <= 1
    brief = machine.CpuMonitor()
    _spin(0.1)
    assert set(brief.stop()) == {"wall_s", "own_cores", "other_cores"}


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_a_worker_process_cpu_is_not_counted_as_other_processes() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nt = time.process_time() + 0.5\nwhile time.process_time() < t: pass\n"
         "print('spun', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        load = machine.CpuLoad()
        before = machine.process_cpu_s(child.pid)
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        worker = machine.process_cpu_s(child.pid) - before  # the child is alive, waiting on stdin
        as_others = load.stop()
        as_own = load.stop(extra_own=worker)
    finally:
        child.communicate("")
    assert worker >= 0.3
    # the worker's CPU moves from the others' share to this process's (the others' share stays ≥ 0)
    moved = as_others["other_cores"] - as_own["other_cores"]
    assert moved == pytest.approx(min(worker / as_own["wall_s"], as_others["other_cores"]), abs=0.05)
    assert as_own["own_cpu_s"] >= worker


def test_a_process_that_is_gone_has_no_cpu_time() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert machine.process_cpu_s(int(child.stdout)) == 0.0


def test_source_info_and_fingerprint_hash_the_same_library_files() -> None:
    info = machine.source_info()
    assert len(info["sources_sha256"]) == 16
    assert info["sources_sha256"].startswith(machine.library_fingerprint())


def test_step_time_runs_as_a_module_with_every_flag() -> None:
    command = [sys.executable, "-m", "scalable_shampoo_bench.step_time", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags = """--device --threads --out --quick --models --block-sizes --frequencies --start-step --periods --warmup
    --chunk --compile-elementwise --bf16-roots --e2e-models --e2e-batch --e2e-seq --batched-compare --batched-steps
    --root-sizes --root-spectra --root-threads --root-repeats --gemm-sizes --sections --profile --profile-steps
    --note""".split()
    assert len(flags) == 27
    missing = [f for f in flags if f not in out.stdout]
    assert not missing
