"""Root recomputation split across data-parallel ranks: time and bytes, world size 1 against 2.

    python -m scalable_shampoo_bench.distributed_time [--out FILE.json] [--layers 8] [--dim 512] [--block 128]

Each rank runs with one thread (so world size 2 uses both cores of a 2-core
machine). Gradients are identical on every rank, as after DDP's all-reduce. A
step that recomputes roots is timed against the steps that don't; their
difference is the time of one full recomputation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scalable_shampoo import Shampoo

FREQ, STEPS = 5, 26


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.dim, args.dim, bias=False) for _ in range(args.layers)])
    opt = Shampoo(model.parameters(), block_size=args.block, precondition_frequency=FREQ,
                  start_preconditioning_step=FREQ, root_method="eigh")  # fmt: skip
    recompute, plain = [], []
    for step in range(1, STEPS + 1):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        (recompute if step >= FREQ and (step - FREQ) % FREQ == 0 else plain).append(dt)
    n_params = sum(p.numel() for p in model.parameters())
    jobs = sum(1 for k in opt.state[next(iter(model.parameters()))] if k.startswith("stat.")) * args.layers
    received = getattr(opt.scheduler, "bytes_received", 0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(world_size=world, recompute_step_ms=[1e3 * x for x in recompute],
                           plain_step_ms=[1e3 * x for x in plain], params=n_params, roots=jobs,
                           bytes_received_per_recompute=received / len(recompute)), f)  # fmt: skip
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if world == 1:
            worker(0, 1, "", args, out)
        else:
            mp.spawn(worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved world-1/world-2 rounds")
    ap.add_argument("--out", default="distributed_time.json")
    args = ap.parse_args(argv)
    rounds = [measure(w, args) for _ in range(args.repeats) for w in (1, 2)]
    summary = {}
    for world in (1, 2):
        runs = [r for r in rounds if r["world_size"] == world]
        rec = statistics.median(x for r in runs for x in r["recompute_step_ms"])
        plain = statistics.median(x for r in runs for x in r["plain_step_ms"])
        summary[world] = dict(recompute_ms=rec - plain, recompute_step_ms=rec, plain_step_ms=plain,
                              bytes_per_recompute=runs[0]["bytes_received_per_recompute"])  # fmt: skip
    r0 = rounds[0]
    result = dict(layers=args.layers, dim=args.dim, block=args.block, params=r0["params"], roots=r0["roots"],
                  param_bytes=4 * r0["params"], torch=torch.__version__, threads_per_rank=1,
                  summary=summary, runs=rounds)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.layers} × Linear {args.dim}², block {args.block}: {r0['roots']} roots, {r0['params']:,} params")
    print("world | one recomputation (ms) | recompute step (ms) | plain step (ms) | bytes received / recompute")
    for world, s in summary.items():
        print(f"{world:5d} | {s['recompute_ms']:22.1f} | {s['recompute_step_ms']:19.1f} | {s['plain_step_ms']:15.1f} |"
              f" {s['bytes_per_recompute']:,.0f} ({s['bytes_per_recompute'] / (4 * r0['params']):.2f}× param bytes)")
    speed = summary[1]["recompute_ms"] / max(summary[2]["recompute_ms"], 1e-9)
    print(f"speed-up of one recomputation at world size 2: {speed:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
