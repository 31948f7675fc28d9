"""Kill a real training process with SIGKILL, resume it, compare bit for bit.

Two kills per scheduler: at a step drawn anew on every test run (the seed is
printed; ``KILL_SEED=…`` replays it), and in the middle of a checkpoint write
(the child stalls inside ``atomic_save`` after writing the temporary file and
before renaming it, and is SIGKILLed there).
"""

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


def command(ckpt: Path, out: Path, scheduler: str) -> list[str]:
    return [sys.executable, str(WORKER), str(ckpt), str(out), str(STEPS), str(EVERY), scheduler]


def run_to_end(ckpt: Path, out: Path, scheduler: str) -> int:
    """Run (or resume) to the end; returns the step it started from."""
    proc = subprocess.run(command(ckpt, out, scheduler), check=True, capture_output=True, text=True)
    return int(proc.stdout.split()[1])  # "start N"


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_and_kill(ckpt: Path, out: Path, scheduler: str, kill_at: int, rng: random.Random) -> None:
    proc = subprocess.Popen(command(ckpt, out, scheduler), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1]) >= kill_at:
            time.sleep(rng.uniform(0, 0.02))  # land anywhere after it, a checkpoint write included
            break
    kill(proc)


def run_and_kill_mid_save(ckpt: Path, out: Path, scheduler: str, save_at: int) -> Path:
    """SIGKILL the run inside the checkpoint write of step ``save_at``; returns the temporary file."""
    env = dict(os.environ, STALL_SAVE_AT=str(save_at))
    proc = subprocess.Popen(command(ckpt, out, scheduler), stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("stalled"):
            break
    else:
        raise AssertionError("the run never reached the stalled checkpoint write")
    tmp = Path(line.split(maxsplit=1)[1].strip())
    assert tmp.exists() and tmp.stat().st_size > 0  # the new checkpoint is written, not yet renamed
    kill(proc)
    return tmp


@pytest.fixture
def seed() -> int:
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(2**32)))
    print(f"KILL_SEED={seed}")  # shown by pytest on a failure: replay with KILL_SEED=… pytest …
    return seed


@pytest.mark.parametrize("scheduler", ["inline", "deterministic"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, scheduler, seed):
    rng = random.Random(seed)
    reference = tmp_path / "reference.pt"
    assert run_to_end(tmp_path / "none.ckpt", reference, scheduler) == 0
    expected = torch.load(reference, weights_only=True)

    def same(out: Path) -> bool:
        got = torch.load(out, weights_only=True)
        return all(torch.equal(got[k], expected[k]) for k in expected)

    # a kill at a random step after the first checkpoint
    ckpt, out = tmp_path / "random.ckpt", tmp_path / "random.pt"
    kill_at = rng.randrange(EVERY + 1, STEPS - 5)
    run_and_kill(ckpt, out, scheduler, kill_at, rng)
    saved = torch.load(ckpt, weights_only=True)  # the checkpoint is whole
    assert saved["step"] % EVERY == 0 and EVERY <= saved["step"] <= STEPS
    assert not out.exists(), "the kill landed after the run had finished"
    assert run_to_end(ckpt, out, scheduler) == saved["step"]  # it resumed, not restarted
    assert same(out), f"kill at step {kill_at}: not bit-identical (KILL_SEED={seed})"

    # a kill in the middle of a checkpoint write: the previous checkpoint survives whole
    ckpt, out = tmp_path / "torn.ckpt", tmp_path / "torn.pt"
    save_at = EVERY * rng.randrange(2, STEPS // EVERY + 1)
    tmp = run_and_kill_mid_save(ckpt, out, scheduler, save_at)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == save_at - EVERY  # the previous checkpoint, untouched
    assert tmp.exists()  # the interrupted write stays in its temporary file, never at ckpt
    assert run_to_end(ckpt, out, scheduler) == save_at - EVERY
    assert same(out), f"kill mid-checkpoint at step {save_at}: not bit-identical (KILL_SEED={seed})"
