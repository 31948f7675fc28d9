"""A script that ends (or dies of an exception) while background roots are in flight
exits as the script says: never an abort ("terminate called without an active
exception", exit code 134), for either mode and either worker kind, with a job
mid-computation (every case), a job queued behind it, an exception in the training
loop, or a scheduler garbage collected mid-computation.

Each case is a real interpreter running ``tests/exit_worker.py``; the cases run
concurrently (started by one fixture) to keep the wall time down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = [
    ("deterministic", "thread", "raise"),
    ("latency", "thread", "queued"),
    ("latency", "thread", "collected"),
    ("deterministic", "process", "queued"),
    ("latency", "process", "raise"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exit")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-m", "tests.exit_worker", *case, str(tmp / "-".join(case))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for case in CASES
    }
    out = {}
    for case, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[case] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("mode, workers, case", CASES)
def test_interpreter_exit_with_roots_in_flight_never_aborts(runs, mode, workers, case):
    code, stdout, stderr = runs[(mode, workers, case)]
    assert "terminate called" not in stderr, stderr
    assert code != -6 and code != 134, (code, stderr)  # SIGABRT
    assert "exiting" in stdout, (stdout, stderr)
    if case == "queued":
        assert "queued 1" in stdout, stdout  # a job really was waiting in the queue at exit
    if case == "raise":
        assert code == 1, (code, stderr)
        assert stderr.rstrip().endswith("RuntimeError: the training loop failed"), stderr
    else:
        assert code == 0, (code, stderr)
        assert stderr == "", stderr
