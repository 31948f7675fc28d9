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


def resume(model: nn.Module, opt: Shampoo, ckpt_dir: str) -> int:
    """The step to start from: 0, or after a restart the last complete checkpoint's, loaded."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        return 0
    with open(latest) as f:
        start = int(f.read())
    load_checkpoint(os.path.join(ckpt_dir, f"step{start}"), model, opt)
    return start


def train(model: nn.Module, opt: Shampoo, ckpt_dir: str, start: int) -> None:
    """Steps ``start`` … STEPS−1 with a DCP checkpoint every EVERY steps; on the first attempt
    rank 1 kills itself with SIGKILL at step KILL_AT."""
    rank, latest = dist.get_rank(), os.path.join(ckpt_dir, "latest")
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


def main() -> None:
    ckpt_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
    train(model, opt, ckpt_dir, resume(model, opt, ckpt_dir))
    if dist.get_rank() == 0:
        torch.save([p.detach() for p in model.parameters()], out)
    dist.barrier()  # leave together: a peer that leaves first can abort gloo's threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
