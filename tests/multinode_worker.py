"""Run by tests/test_distributed.py under two torchrun agents ("nodes") of 2 processes each:
trains a few steps of ZeRO-1 Shampoo with the same gradients on every rank, and rank 0
writes the parameters and the world it saw.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT multinode_worker.py OUT
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from scalable_shampoo import Shampoo

STEPS = 8


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def grads(model, step):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    model = build()
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2)
    for step in range(STEPS):
        grads(model, step)
        opt.step()
    owned = sum(r == dist.get_rank() for pieces in opt.rows() for r, *_ in pieces)
    info = torch.tensor([owned], dtype=torch.int64)
    dist.all_reduce(info)  # every parameter (or run of rows of one) has exactly one owner across the nodes
    if dist.get_rank() == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "world": dist.get_world_size(),
                    "nodes": int(os.environ["GROUP_WORLD_SIZE"]), "owned": int(info),
                    "pieces": sum(len(pieces) for pieces in opt.rows())}, sys.argv[1])  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
