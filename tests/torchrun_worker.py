"""Trained under torchrun by tests/test_distributed.py: checkpoints with DCP every few
steps, resumes from the last checkpoint when torchrun restarts it, and on its first
attempt rank 1 kills itself with SIGKILL mid-run.

    torchrun --nproc-per-node 2 --max-restarts 2 torchrun_worker.py CKPT_DIR OUT
"""

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.distributed import load_checkpoint, save_checkpoint

STEPS, EVERY, KILL_AT = 12, 3, 7


def grads(model, step):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))


def main() -> None:
    ckpt_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
    latest = os.path.join(ckpt_dir, "latest")
    start = 0
    if os.path.exists(latest):  # a restart: resume from the last complete checkpoint
        with open(latest) as f:
            start = int(f.read())
        load_checkpoint(os.path.join(ckpt_dir, f"step{start}"), model, opt)
    for step in range(start, STEPS):
        if rank == 1 and step == KILL_AT and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        grads(model, step)  # the same on every rank, as after DDP's all-reduce
        opt.step()
        if (step + 1) % EVERY == 0:
            save_checkpoint(os.path.join(ckpt_dir, f"step{step + 1}"), model, opt)
            dist.barrier()
            if rank == 0:  # publish only a checkpoint that every rank has finished writing
                with open(latest + ".tmp", "w") as f:
                    f.write(str(step + 1))
                os.replace(latest + ".tmp", latest)
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out)
    dist.barrier()  # leave together: a peer that leaves first can abort gloo's threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
