"""FSDP2 Shampoo, ``fsdp="local"`` against ``fsdp="lossless"``: the loss on the lm task.

    python -m scalable_shampoo_bench.fsdp_loss [--world 2] [--steps 200] [--seeds 0,1,2] [--out FILE.json]

The lm task's char-level GPT (4 layers, d=128, ctx 128, batch 32, Shakespeare): every
GPT block and the root wrapped by ``fully_shard`` on ``--world`` gloo processes (one torch
thread each), each taking its 32/W rows of every batch (FSDP2 averages the gradients), with
the task's Shampoo (library defaults, the task's lr and weight decay, warm-up + cosine).
``lossless`` steps every parameter as one process would; ``local`` cuts the blocks from each
rank's rows (at W=2 a 512×128 weight is preconditioned as two 256×128 halves, the 65×128
embedding and head as two 42-row shards). Prints and writes the validation loss (nats/char) of
both modes at every evaluation, per seed, and the final difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.optimizers import schedule
from scalable_shampoo_bench.tasks import TASKS


def worker(rank: int, world: int, init_file: str, mode: str, seed: int, steps: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # CharGPT's logits are a view: harmless here
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    task = TASKS["lm"]
    torch.manual_seed(seed)
    problem = task.build(False, torch.device("cpu"))
    model = problem.model
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = Shampoo(model.parameters(), lr=task.lrs["shampoo"], weight_decay=task.weight_decay, fsdp=mode)
    sched = schedule(opt, steps)
    batches = problem.batches(torch.Generator().manual_seed(seed))
    curve = [(0, problem.evaluate(model))]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = problem.loss(model, (x[rank::world], y[rank::world]))  # this rank's rows of the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % task.eval_every == 0 or step == steps:
            curve.append((step, problem.evaluate(model)))
    seconds = time.perf_counter() - start
    state = sum(v for k, v in opt.memory().items() if k not in ("parameters", "scratch"))
    states = [0] * world
    dist.all_gather_object(states, state)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"mode": mode, "seed": seed, "curve": curve, "seconds": seconds, "state_bytes": states}, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, mode: str, seed: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), mode, seed, steps, out), nprocs=world)
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
            return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=TASKS["lm"].default_steps)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="scalable_shampoo_bench/results/fsdp_loss.json")
    a = ap.parse_args(argv)
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for mode in ("lossless", "local"):
            r = measure(a.world, mode, seed, a.steps)
            runs.append(r)
            print(f"seed {seed} {mode}: val loss {r['curve'][-1][1]:.4f} after {a.steps} steps "
                  f"({r['seconds']:.0f} s), state per rank {r['state_bytes']} bytes", flush=True)  # fmt: skip
    final = {mode: [r["curve"][-1][1] for r in runs if r["mode"] == mode] for mode in ("lossless", "local")}
    diffs = [lo - ll for ll, lo in zip(final["lossless"], final["local"])]
    summary = {"median_final_val_loss": {m: statistics.median(v) for m, v in final.items()},
               "local_minus_lossless": diffs, "median_local_minus_lossless": statistics.median(diffs)}  # fmt: skip
    print(f"median final val loss: lossless {summary['median_final_val_loss']['lossless']:.4f}, local "
          f"{summary['median_final_val_loss']['local']:.4f} (local − lossless per seed: "
          f"{', '.join(f'{d:+.4f}' for d in diffs)})")  # fmt: skip
    command = "python -m scalable_shampoo_bench.fsdp_loss " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(a.out, "w") as f:
        json.dump({"task": "lm", "world": a.world, "steps": a.steps, "metric": TASKS["lm"].metric, "command": command,
                   "torch": torch.__version__, "threads_per_rank": 1, "summary": summary, "runs": runs}, f,
                  indent=1)  # fmt: skip
    return 0 if all(math.isfinite(v) for v in final["local"] + final["lossless"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
