"""Trained under torchrun by tests/test_sharded_checkpoint.py: sharded DCP checkpoints
every few steps with deterministic background roots (results pending at each
checkpoint); on its first attempt rank 1 kills itself with SIGKILL, and torchrun
restarts the group, which resumes from the last complete checkpoint.

    torchrun --nproc-per-node 2 --max-restarts 2 sharded_torchrun_worker.py CKPT_DIR OUT
"""

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, InlineRoots
from scalable_shampoo.distributed import load_checkpoint, save_checkpoint

STEPS, EVERY, KILL_AT = 12, 3, 7  # roots at steps 2, 5, 8, 11, each installed 2 steps later


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def make(model: nn.Module, background: bool = True, **kw) -> Shampoo:
    scheduler = BackgroundRoots(mode="deterministic", delay=2) if background else InlineRoots(delay=2)
    return Shampoo(model.parameters(), lr=1e-2, momentum=0.5, precondition_frequency=3, start_preconditioning_step=2,
                   block_size=4, scheduler=scheduler, **kw)  # fmt: skip


def grads(model: nn.Module, step: int) -> None:
    for i, p in enumerate(model.parameters()):  # the same on every rank, as after DDP's all-reduce
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))


def main() -> None:
    ckpt_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = build()
    opt = make(model)
    latest = os.path.join(ckpt_dir, "latest")
    start, pending = 0, 0
    if os.path.exists(latest):  # a restart: resume from the last complete checkpoint
        with open(latest) as f:
            start = int(f.read())
        load_checkpoint(os.path.join(ckpt_dir, f"step{start}"), model, opt)
        pending = sum(len(e["outcomes"]) for e in opt.scheduler.state_dict()["pending"])
    for step in range(start, STEPS):
        if rank == 1 and step == KILL_AT and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        grads(model, step)
        opt.step()
        if (step + 1) % EVERY == 0:
            save_checkpoint(os.path.join(ckpt_dir, f"step{step + 1}"), model, opt)
            dist.barrier()
            if rank == 0:  # publish only a checkpoint that every rank has finished writing
                with open(latest + ".tmp", "w") as f:
                    f.write(str(step + 1))
                os.replace(latest + ".tmp", latest)
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, pending)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "owners": opt.owners(), "start": start,
                    "pending_loaded": counts}, out)  # fmt: skip
    opt.close()
    dist.barrier()  # leave together: a peer that leaves first can abort gloo's threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
