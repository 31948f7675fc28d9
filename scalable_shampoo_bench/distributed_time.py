"""Sharded Shampoo across ranks: per-rank state, step work and bytes, world sizes 1, 2, 4.

    python -m scalable_shampoo_bench.distributed_time [--worlds 1,2,4] [--modes ddp,lossless,local]
        [--comm fp32,bf16] [--out FILE.json]

The model is the step-time benchmark's Transformer (4 encoder layers, d=512, ff 2048;
192 blocks at block size 256), under three modes: ``ddp`` (plain parameters, ZeRO-1),
and FSDP2 (``fully_shard`` of every encoder layer and the root) with
``Shampoo(fsdp="lossless")`` or ``fsdp="local"``. Every rank gets the same gradients, as
after DDP's all-reduce (FSDP2: its shard of them, as after the reduce-scatter), and runs
one torch thread. Per rank it records:

* the optimizer state in bytes (``opt.memory()``, each storage once, parameters and
  scratch apart), exact whatever the machine;
* the step's compute as **CPU time** of the process (``time.process_time``) minus
  that of the exchange, so that ranks that share a small machine's cores are still
  measured fairly, and the exchange's wall time apart;
* the bytes it received per step (ddp: the all_gather of the owned updates; lossless:
  the two all_to_all of gradient rows and update rows; local: only the per-parameter
  finite-gradient flags) and per root recomputation (none: roots never leave their owner);
* its parameters' bytes (FSDP2: its shards').
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
from torch.distributed.tensor import DTensor, distribute_tensor

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.step_time.models import make_model

FREQ, WARMUP, STEPS = 5, 2, 10


def _state_bytes(opt: Shampoo) -> dict[str, int]:
    m = opt.memory()
    return {"state": sum(v for k, v in m.items() if k not in ("parameters", "scratch")), "scratch": m["scratch"],
            "parameters": m["parameters"]}  # fmt: skip


def _exchange(opt: Shampoo) -> tuple[float, float, int]:
    """Wall and CPU seconds spent in collectives so far, and bytes received."""
    shs = [sh for sh in (opt._sharding, *opt._replicas.values()) if sh is not None]
    return (sum(sh.exchange_s for sh in shs), sum(sh.exchange_cpu_s for sh in shs),
            sum(sh.bytes_received for sh in shs))  # fmt: skip


def worker(rank: int, world: int, init_file: str, args: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))  # fmt: skip
    model = make_model("transformer", args["quick"], torch.device("cpu"))
    mode = args["mode"]
    if mode != "ddp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    comm = torch.bfloat16 if args["comm"] == "bf16" else None
    opt = Shampoo(model.parameters(), block_size=args["block"], precondition_frequency=FREQ,
                  start_preconditioning_step=1, communication_dtype=comm,
                  fsdp="lossless" if mode == "ddp" else mode)  # fmt: skip
    cpu, wall, exchange = [], [], []
    for step in range(WARMUP + STEPS):
        for i, p in enumerate(model.parameters()):
            full = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i)) * 1e-2
            if isinstance(p, DTensor):  # this rank's rows, as after FSDP2's reduce-scatter
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.grad = full
        if world > 1:
            dist.barrier()
        before_x, before_xc, _ = _exchange(opt)
        c, t = time.process_time(), time.perf_counter()
        opt.step()
        c, t = time.process_time() - c, time.perf_counter() - t
        after_x, after_xc, _ = _exchange(opt)
        if step >= WARMUP:
            cpu.append(c - (after_xc - before_xc))  # the step's compute: its CPU time less the exchange's
            wall.append(t)
            exchange.append(after_x - before_x)
    received = _exchange(opt)[2]
    params = sum(p.to_local().numel() * p.element_size() if isinstance(p, DTensor) else p.numel() * p.element_size()
                 for p in model.parameters())  # fmt: skip
    rec = dict(rank=rank, world=world, mode=mode, comm=args["comm"], **_state_bytes(opt), rank_parameters=params,
               blocks=sum(len(b.members) and b.rows for b in opt._buckets.buckets),
               pieces=sum(r == rank for ps in opt.rows() for r, *_ in ps),  # parameters (or rows of them) it computes
               split_params=sum(len(ps) > 1 for ps in opt.rows()),
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
            worker(0, 1, "", {**args, "comm": "fp32", "mode": "ddp"}, out)
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
    ap.add_argument("--modes", default="ddp,lossless,local", help="ddp, and FSDP2's lossless and local")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="a tiny model, for the smoke test")
    ap.add_argument("--out", default="scalable_shampoo_bench/results/distributed_time.json")
    a = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for world in (int(w) for w in a.worlds.split(",")):
        for mode in a.modes.split(",") if world > 1 else ["ddp"]:
            for comm in a.comm.split(",") if world > 1 and mode != "local" else ["fp32"]:  # local: nothing travels
                print(f"W={world} {mode} {comm} …", flush=True)
                runs += measure(world, {"block": a.block, "quick": a.quick, "comm": comm, "mode": mode})
    one = [r for r in runs if r["world"] == 1][0]
    summary = []
    for world, mode, comm in sorted({(r["world"], r["mode"], r["comm"]) for r in runs}):
        rs = [r for r in runs if r["world"] == world and r["mode"] == mode and r["comm"] == comm]
        row = dict(world=world, mode=mode, comm=comm, max_state_bytes=max(r["state"] for r in rs),
                   max_rank_parameter_bytes=max(r["rank_parameters"] for r in rs),
                   max_cpu_step_ms=max(r["cpu_step_ms"] for r in rs),
                   max_state_ratio_x_w=max(r["state"] for r in rs) / one["state"] * world,
                   max_compute_ratio_x_w=max(r["cpu_step_ms"] for r in rs) / one["cpu_step_ms"] * world,
                   bytes_per_step_over_param_bytes=max(r["bytes_received_per_step"] for r in rs) / one["parameters"],
                   exchange_wall_ms=max(r["exchange_wall_ms"] for r in rs))  # fmt: skip
        summary.append(row)
        print(f"W={world} {mode} {comm}: per-rank state ≤ {row['max_state_ratio_x_w']:.3f}/W of one process's, "
              f"step CPU ≤ {row['max_compute_ratio_x_w']:.3f}/W, received {row['bytes_per_step_over_param_bytes']:.3f}×"
              f" the parameter bytes per step, exchange {row['exchange_wall_ms']:.1f} ms", flush=True)  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"model": "transformer d=512, 4 layers" if not a.quick else "transformer (quick)", "block": a.block,
                   "frequency": FREQ, "steps": STEPS, "threads_per_rank": 1, "torch": torch.__version__,
                   "summary": summary, "runs": runs}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
