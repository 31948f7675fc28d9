"""Kill a real training process with SIGKILL at a random step, resume it, compare bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS, EVERY = 30, 4


def run_to_end(ckpt: Path, out: Path, scheduler: str) -> None:
    subprocess.run([sys.executable, str(WORKER), str(ckpt), str(out), str(STEPS), str(EVERY), scheduler], check=True)


def run_and_kill(ckpt: Path, out: Path, scheduler: str, kill_at: int, rng: random.Random) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(ckpt), str(out), str(STEPS), str(EVERY), scheduler],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if int(line.split()[1]) >= kill_at:
            time.sleep(rng.uniform(0, 0.02))  # land anywhere, a checkpoint write included
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("scheduler", ["inline", "deterministic"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, scheduler):
    reference = tmp_path / "reference.pt"
    run_to_end(tmp_path / "none.ckpt", reference, scheduler)
    expected = torch.load(reference, weights_only=True)

    rng = random.Random(1234)
    trials = 2
    identical = 0
    for trial in range(trials):
        ckpt, out = tmp_path / f"run{trial}.ckpt", tmp_path / f"run{trial}.pt"
        run_and_kill(ckpt, out, scheduler, kill_at=rng.randrange(2, STEPS - 2), rng=rng)
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # the checkpoint is whole
        run_to_end(ckpt, out, scheduler)
        got = torch.load(out, weights_only=True)
        identical += all(torch.equal(got[k], expected[k]) for k in expected)
    assert identical == trials
