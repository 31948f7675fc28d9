"""Trained under torchrun by tests/test_sharded_checkpoint.py: sharded DCP checkpoints
every few steps with deterministic background roots (results pending at each
checkpoint); on its first attempt rank 1 kills itself with SIGKILL, and torchrun
restarts the group, which resumes from the last complete checkpoint.

    torchrun --nproc-per-node 2 --max-restarts 2 sharded_torchrun_worker.py CKPT_DIR OUT
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torchrun_worker import STEPS, grads, resume, train  # 12 steps: roots at 2, 5, 8, 11, each installed 2 later

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, InlineRoots

__all__ = ["STEPS", "build", "grads", "layout", "make"]


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def make(model: nn.Module, background: bool = True, **kw) -> Shampoo:
    scheduler = BackgroundRoots(mode="deterministic", delay=2) if background else InlineRoots(delay=2)
    return Shampoo(model.parameters(), lr=1e-2, momentum=0.5, precondition_frequency=3, start_preconditioning_step=2,
                   block_size=4, scheduler=scheduler, **kw)  # fmt: skip


def layout(opt: Shampoo) -> dict[str, list]:
    """Who computes what (``opt.rows()``), and the first row of each parameter's blocks."""
    rows = [[b.index[0].start if b.index else 0 for b in opt.plan(p, g).blocks] for g in opt.param_groups
            for p in g["params"]]  # fmt: skip
    return {"rows": opt.rows(), "block_rows": rows}


def main() -> None:
    ckpt_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    model = build()
    opt = make(model)
    start = resume(model, opt, ckpt_dir)
    pending = sum(len(e["outcomes"]) for e in opt.scheduler.state_dict()["pending"]) if start else 0
    train(model, opt, ckpt_dir, start)
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, pending)
    if dist.get_rank() == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "layout": layout(opt), "start": start,
                    "pending_loaded": counts}, out)  # fmt: skip
    opt.close()
    dist.barrier()  # leave together: a peer that leaves first can abort gloo's threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
