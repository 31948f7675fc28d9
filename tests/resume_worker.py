"""A training run that checkpoints every K steps and resumes from its last checkpoint.

Run by tests/test_kill_resume.py as a real subprocess, which SIGKILLs it at a
random step and then starts it again. Usage:
    python resume_worker.py CKPT OUT STEPS EVERY SCHEDULER

With ``STALL_SAVE_AT=N`` in the environment, the checkpoint of step N stalls inside
``atomic_save`` after the data is written and fsynced but before the rename (it
prints ``stalled TMP`` and sleeps), so the test can SIGKILL it in the middle of a
checkpoint write.
"""

import os
import sys
import time

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
    saving = [0]  # the step of the checkpoint being written
    stall = int(os.environ.get("STALL_SAVE_AT", "0"))
    if stall:
        rename = os.replace

        def stalled_rename(src, dst):  # atomic_save's rename: stall before it at step `stall`
            if saving[0] == stall:
                print(f"stalled {src}", flush=True)
                time.sleep(3600)
            rename(src, dst)

        os.replace = stalled_rename
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    print(f"start {start}", flush=True)
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)  # the data of a step depends on the step alone
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if (step + 1) % every == 0:
            saving[0] = step + 1
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
        print(f"step {step + 1}", flush=True)
    torch.save(model.state_dict(), out)
    opt.close()


if __name__ == "__main__":
    main()
