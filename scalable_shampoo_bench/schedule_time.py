"""Step time under a momentum-cycling schedule (``OneCycleLR``) against a constant lr.

``OneCycleLR`` writes ``group["lr"]`` and ``group["betas"]`` (β₁) at every step.
Neither changes a tensor's shape or dtype, so neither may make the batched path
rebuild its buckets; this measures that it costs nothing. Two identical models and
optimizers, one with ``OneCycleLR`` and one at a constant lr, step interleaved
(A B, B A, A B, …) on the same data; each ``opt.step()`` (plus its
``scheduler.step()``) is timed. Reported: the median step time of each, their
ratio, and how many times each optimizer built its buckets.

    python -m scalable_shampoo_bench.schedule_time --threads 1     # ~1 minute on 2 cores

Writes ``scalable_shampoo_bench/results/schedule_time.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scalable_shampoo import Shampoo

from .machine import CpuMonitor, describe


def build(args: argparse.Namespace, schedule: str) -> tuple[torch.nn.Module, Shampoo, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.dim, args.dim) for _ in range(args.layers)])
    opt = Shampoo(model.parameters(), lr=args.lr, block_size=args.block_size, start_preconditioning_step=args.start,
                  precondition_frequency=args.freq)
    sched = None
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps + 1)
    return model, opt, sched


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--start", type=int, default=5, help="start_preconditioning_step (roots once, at this step)")
    ap.add_argument("--freq", type=int, default=10**6, help="precondition_frequency")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "schedule_time.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["constant", "onecycle"]
    runs = {n: build(args, n) for n in names}
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(args.batch, args.dim, generator=gen) for _ in range(8)]
    times: dict[str, list[float]] = {n: [] for n in names}
    betas: list[float] = []
    monitor = CpuMonitor()
    for i in range(args.steps):
        x = data[i % len(data)]
        for n in names if i % 2 == 0 else names[::-1]:  # interleaved, alternating the order
            model, opt, sched = runs[n]
            opt.zero_grad()
            model(x).square().mean().backward()
            t0 = time.perf_counter()
            opt.step()
            if sched is not None:
                sched.step()
            times[n].append(time.perf_counter() - t0)
        betas.append(runs["onecycle"][1].param_groups[0]["betas"][0])
    load = monitor.stop()
    skip = args.start + 1  # the steps up to the roots' computation are not the steady state
    med = {n: statistics.median(t[skip:]) for n, t in times.items()}
    builds = {n: runs[n][1]._buckets.builds for n in names}
    ratio = med["onecycle"] / med["constant"]
    print(f"{args.layers}×Linear({args.dim}), block {args.block_size}, {args.steps} steps interleaved, "
          f"torch threads {args.threads}; medians of steps {skip + 1}…{args.steps}")
    for n in names:
        print(f"{n:9s} median {med[n] * 1e3:7.1f} ms   bucket builds {builds[n]}")
    print(f"onecycle / constant: {ratio:.3f}   (β₁ ranged {min(betas):.3f}…{max(betas):.3f}; load {load})")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out = dict(
        config=config | {"machine": describe(torch.device("cpu"), args.threads)},
        median_step_s=med, ratio_onecycle_over_constant=ratio, bucket_builds=builds,
        beta1_range=[min(betas), max(betas)], load=load, step_s=times,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
