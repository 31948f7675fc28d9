"""``examples/ddp_example.py`` under a real ``torchrun`` with 2 gloo processes, DDP-wrapped, on
Shakespeare: both ranks end bit-identical, and match one process that averages the two ranks'
gradients itself and steps a single Shampoo: bit for bit until the first roots, to rounding after.

Why not bit for bit after the roots: each rank computes its share of the roots in its own
batches, and a root's relative ε comes from λ_max, which the batched power iteration rounds
differently with the batch's size (128×128 statistics: last bits of λ_max in fp64, then of the
fp32 root). The ranks agree with each other exactly (the roots are exchanged as bytes)."""

import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from example_loader import EXAMPLES, assert_bitwise, load, one_thread  # noqa: F401 (autouse fixture)

from scalable_shampoo import Shampoo

ddp = load("ddp_example")
STEPS, BATCH, WORLD = 6, 8, 2  # roots at step 3 (split across the 2 ranks), installed at once


def single_process(steps):
    data, vocab = ddp.windows(steps * BATCH * WORLD)
    loaders = [ddp.rank_loader(data, r, WORLD, BATCH) for r in range(WORLD)]
    model = ddp.make_model(vocab)
    opt = Shampoo(model.parameters(), process_group=None, **ddp.SHAMPOO)
    losses = []
    for batches in zip(*loaders):
        grads, step_losses = [], []
        for x, y in batches:  # each rank's forward and backward
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            step_losses.append(loss.detach())
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / WORLD  # DDP's average (÷2 is exact, + is commutative)
        opt.step()
        losses.append((step_losses[0] + step_losses[1]).item() / WORLD)
    return model, opt, losses


def test_ddp_under_torchrun_ranks_agree_and_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(EXAMPLES / "ddp_example.py"), "--steps", str(STEPS), "--batch-per-rank", str(BATCH),
           "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert_bitwise(ranks[0]["model"], ranks[1]["model"])
    assert len(ranks[0]["losses"]) == STEPS and ranks[0]["losses"][-1] < ranks[0]["losses"][0] - 0.3

    model, opt, losses = single_process(STEPS)
    assert any(r["has_root"] for r in opt.diagnostics()["blocks"])
    first_roots = ddp.SHAMPOO["start_preconditioning_step"]  # its loss is computed before its step
    assert ranks[0]["losses"][:first_roots] == losses[:first_roots]  # DDP's average is (g0 + g1) / 2 exactly
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=1e-6, atol=0)
    for k, v in model.state_dict().items():
        # atol: the key part of qkv.bias has a zero gradient up to rounding, which Adam's
        # normalisation turns into lr-sized steps; it differs by ~2e-5 (the lr is 3e-3)
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=1e-5, atol=1e-4)
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    mine = opt.state_dict()
    assert saved["scalable_shampoo"]["global_step"] == STEPS
    for pid, state in mine["state"].items():
        assert saved["state"][pid].keys() == state.keys()
        for k, v in state.items():
            if k.startswith(("stat.", "exp_avg", "graft_acc")):
                torch.testing.assert_close(saved["state"][pid][k], v, rtol=1e-4, atol=1e-7)
