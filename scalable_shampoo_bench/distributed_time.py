"""ZeRO-1 Shampoo across data-parallel ranks: per-rank state, step work and bytes, world sizes 1, 2, 4.

    python -m scalable_shampoo_bench.distributed_time [--worlds 1,2,4] [--comm fp32,bf16] [--out FILE.json]

The model is the step-time benchmark's Transformer (4 encoder layers, d=512, ff 2048;
192 blocks at block size 256). Every rank gets the same gradients, as after DDP's
all-reduce, and runs one torch thread. Per rank it records:

* the optimizer state in bytes (``opt.memory()``, each storage once, parameters and
  scratch apart), exact whatever the machine;
* the step's compute as **CPU time** of the process (``time.process_time``) minus
  that of the exchange, so that ranks that share a small machine's cores are still
  measured fairly, and the exchange's wall time apart;
* the bytes it received per step (the all_gather of the owned updates) and per root
  recomputation (none: roots never leave their owner).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.step_time.models import make_model

FREQ, WARMUP, STEPS = 5, 2, 10


def _state_bytes(opt: Shampoo) -> dict[str, int]:
    m = opt.memory()
    return {"state": sum(v for k, v in m.items() if k not in ("parameters", "scratch")), "scratch": m["scratch"],
            "parameters": m["parameters"]}  # fmt: skip


def worker(rank: int, world: int, init_file: str, args: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))  # fmt: skip
    model = make_model("transformer", args["quick"], torch.device("cpu"))
    comm = torch.bfloat16 if args["comm"] == "bf16" else None
    opt = Shampoo(model.parameters(), block_size=args["block"], precondition_frequency=FREQ,
                  start_preconditioning_step=1, communication_dtype=comm)  # fmt: skip
    cpu, wall, exchange = [], [], []
    for step in range(WARMUP + STEPS):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i)) * 1e-2
        if world > 1:
            dist.barrier()
        sh = opt._sharding
        before_x, before_xc = (sh.exchange_s, sh.exchange_cpu_s) if sh else (0.0, 0.0)
        c, t = time.process_time(), time.perf_counter()
        opt.step()
        c, t = time.process_time() - c, time.perf_counter() - t
        x, xc = (sh.exchange_s - before_x, sh.exchange_cpu_s - before_xc) if sh else (0.0, 0.0)
        if step >= WARMUP:
            cpu.append(c - xc)  # the step's compute: its CPU time less the exchange's
            wall.append(t)
            exchange.append(x)
    received = opt._sharding.bytes_received if opt._sharding else 0
    rec = dict(rank=rank, world=world, comm=args["comm"], **_state_bytes(opt),
               blocks=sum(len(b.members) and b.rows for b in opt._buckets.buckets),
               owned_params=sum(1 for o in opt.owners() if o == rank),
               cpu_step_ms=1e3 * statistics.fmean(cpu), wall_step_ms=1e3 * statistics.fmean(wall),
               exchange_wall_ms=1e3 * statistics.fmean(exchange), bytes_received_per_step=received / (WARMUP + STEPS),
               bytes_received_per_root_recomputation=0)  # fmt: skip
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rec, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if world == 1:
            worker(0, 1, "", {**args, "comm": "fp32"}, out)
        else:
            mp.spawn(worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
        recs = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                recs.append(json.load(f))
        return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--comm", default="fp32,bf16", help="communication dtypes to measure at world sizes > 1")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="a tiny model, for the smoke test")
    ap.add_argument("--out", default="scalable_shampoo_bench/results/distributed_time.json")
    a = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for world in (int(w) for w in a.worlds.split(",")):
        for comm in a.comm.split(",") if world > 1 else ["fp32"]:
            runs += measure(world, {"block": a.block, "quick": a.quick, "comm": comm})
    one = [r for r in runs if r["world"] == 1][0]
    summary = []
    for world, comm in sorted({(r["world"], r["comm"]) for r in runs}):
        rs = [r for r in runs if r["world"] == world and r["comm"] == comm]
        row = dict(world=world, comm=comm,
                   max_state_ratio_x_w=max(r["state"] for r in rs) / one["state"] * world,
                   max_compute_ratio_x_w=max(r["cpu_step_ms"] for r in rs) / one["cpu_step_ms"] * world,
                   bytes_per_step_over_param_bytes=max(r["bytes_received_per_step"] for r in rs) / one["parameters"],
                   exchange_wall_ms=max(r["exchange_wall_ms"] for r in rs))  # fmt: skip
        summary.append(row)
        print(f"W={world} {comm}: per-rank state ≤ {row['max_state_ratio_x_w']:.3f}/W of one process's, "
              f"step CPU ≤ {row['max_compute_ratio_x_w']:.3f}/W, received {row['bytes_per_step_over_param_bytes']:.3f}×"
              f" the parameter bytes per step, exchange {row['exchange_wall_ms']:.1f} ms", flush=True)  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"model": "transformer d=512, 4 layers" if not a.quick else "transformer (quick)", "block": a.block,
                   "frequency": FREQ, "steps": STEPS, "threads_per_rank": 1, "torch": torch.__version__,
                   "summary": summary, "runs": runs}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
