"""A training run that checkpoints every K steps and resumes from its last checkpoint.

Run by tests/test_kill_resume.py as a real subprocess, which SIGKILLs it at a
random step and then starts it again. Usage:
    python resume_worker.py CKPT OUT STEPS EVERY SCHEDULER
"""

import os
import sys

import torch
from torch import nn

from scalable_shampoo import Shampoo, atomic_save


def make_scheduler(name: str):
    if name == "inline":
        return None
    from scalable_shampoo.background import BackgroundRoots

    return BackgroundRoots(mode="deterministic", delay=2)


def main() -> None:
    ckpt, out, steps, every, scheduler = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=3, start_preconditioning_step=2,
                  scheduler=make_scheduler(scheduler))  # fmt: skip
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)  # the data of a step depends on the step alone
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if (step + 1) % every == 0:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
        print(f"step {step + 1}", flush=True)
    torch.save(model.state_dict(), out)
    opt.close()


if __name__ == "__main__":
    main()
