"""Memory of the optimizer state, a root recomputation's working memory, and the
first-step cost of ``compile_elementwise``: the figures the README quotes.

    python -m scalable_shampoo_bench.memory_report --threads 1     # ~2–6 minutes on 2 cores (compiling)

Sections (``--sections``, default all three):

- ``state``: ``optimizer.memory()`` on the char-GPT of the step-time benchmark
  (``CharGPT(65, 128, d=128, layers=4, heads=4)``) after 3 steps with roots, for
  block 1024 and 256, roots stored in fp32 and in bf16: bytes by kind and each
  kind ÷ the parameters' bytes.
- ``roots``: how far the process's peak resident memory (``VmHWM``, reset just
  before through ``/proc/self/clear_refs``) rises above its resident memory then,
  while ``compute_roots`` computes the inverse 4th roots of 96 statistics of 256²
  (24 MB), split into at most ``ROOT_BATCHES`` batches (the library) and as one
  batch; each variant in a fresh interpreter, ``--repeats`` times.
- ``compile``: the wall time of the first and the second step of
  ``Shampoo(compile_elementwise=True)`` on the char-GPT (the first one compiles),
  against the eager path's, in a fresh interpreter.

Writes ``scalable_shampoo_bench/results/memory_report.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scalable_shampoo import Shampoo

from .machine import CpuMonitor, describe
from .step_time import make_model, set_fixed_grads


def state_memory(block_size: int, bf16: bool) -> dict[str, Any]:
    model = make_model("chargpt", False, torch.device("cpu"))
    set_fixed_grads(model, seed=1)
    opt = Shampoo(model.parameters(), block_size=block_size, start_preconditioning_step=1, precondition_frequency=2,
                  root_storage_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip
    for _ in range(3):
        opt.step()
    mem = opt.memory()
    params = mem.pop("parameters")
    total = sum(mem.values())
    return dict(block_size=block_size, root_storage="bf16" if bf16 else "fp32", parameter_bytes=params, bytes=mem,
                over_parameters={k: round(v / params, 2) for k, v in mem.items()},
                total_over_parameters=round(total / params, 2))  # fmt: skip


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def roots_child(batches: int, count: int, n: int) -> None:
    """In a fresh interpreter: peak growth while computing ``count`` roots of n², in ≤ ``batches`` batches."""
    from scalable_shampoo import background
    from scalable_shampoo.background import RootJob, RootOptions, compute_roots
    from scalable_shampoo.matrix_roots import RootMethod

    gen = torch.Generator().manual_seed(0)
    opts = RootOptions(RootMethod.EIGH, 1e-6, True, torch.float32, 0.5, 3, 100, 1e-6)
    mats = []
    for _ in range(count):
        g = torch.randn(n, 2 * n, generator=gen)
        mats.append(g @ g.T / (2 * n))
    jobs = [RootJob((i, 0, 0), 1, m, 4, opts) for i, m in enumerate(mats)]
    compute_roots(jobs[:1])  # LAPACK and the allocator warmed up on one matrix
    background.ROOT_BATCHES = batches
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident memory now
    outs = compute_roots(jobs)
    peak = _status_mb("VmHWM")
    assert len(outs) == count and all(o.ok for o in outs)
    print(json.dumps(dict(peak_growth_mb=round(peak - before, 1), statistics_mb=round(count * n * n * 4 / 2**20, 1),
                          roots_mb=round(sum(o.root.nbytes for o in outs) / 2**20, 1))))


def compile_child(compiled: bool) -> None:
    model = make_model("chargpt", False, torch.device("cpu"))
    set_fixed_grads(model, seed=1)
    opt = Shampoo(model.parameters(), block_size=256, start_preconditioning_step=1, precondition_frequency=1000,
                  compile_elementwise=compiled)  # fmt: skip
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(first_step_s=round(times[0], 2), second_step_s=round(times[1], 3),
                          third_step_s=round(times[2], 3))))  # fmt: skip


def child(args: list[str], threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "scalable_shampoo_bench.memory_report", "--threads", str(threads), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="state,roots,compile")
    ap.add_argument("--repeats", type=int, default=3, help="fresh interpreters per root-memory variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_report.json"))
    ap.add_argument("--roots-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", choices=("compiled", "eager"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.roots_child:
        return roots_child(args.roots_child, 96, 256)
    if args.compile_child:
        return compile_child(args.compile_child == "compiled")
    from scalable_shampoo.background import ROOT_BATCHES

    sections = args.sections.split(",")
    monitor = CpuMonitor()
    out: dict[str, Any] = dict(machine=describe(torch.device("cpu"), args.threads), sections=sections)
    if "state" in sections:
        out["state"] = [state_memory(bs, bf16) for bs in (1024, 256) for bf16 in (False, True)]
        print("| block | root storage | statistics | roots | moments | CPU scratch | total state ÷ parameters |")
        for r in out["state"]:
            o = r["over_parameters"]
            moments = round(o["first_moment"] + o["grafting"], 2)
            print(f"| {r['block_size']} | {r['root_storage']} | {o['statistics']}× | {o['roots']}× | {moments}× | "
                  f"{o['scratch']}× | {r['total_over_parameters']}× |")
    if "roots" in sections:
        runs = {label: [child(["--roots-child", str(b)], args.threads) for _ in range(args.repeats)]
                for label, b in (("split", ROOT_BATCHES), ("one_batch", 1))}  # fmt: skip
        out["roots"] = dict(matrices=96, n=256, root_batches=ROOT_BATCHES, runs=runs,
                            peak_growth_mb={k: [r["peak_growth_mb"] for r in v] for k, v in runs.items()})  # fmt: skip
        for k, v in out["roots"]["peak_growth_mb"].items():
            print(f"roots, {k}: peak growth {v} MB (statistics {runs[k][0]['statistics_mb']} MB)")
    if "compile" in sections:
        out["compile"] = {k: child(["--compile-child", k], args.threads) for k in ("compiled", "eager")}
        for k, v in out["compile"].items():
            print(f"{k}: first step {v['first_step_s']} s, second {v['second_step_s']} s")
    out["load"] = monitor.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} (load {out['load']})")


if __name__ == "__main__":
    main()
