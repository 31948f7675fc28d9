import csv

import torch
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.diagnostics_log import DiagnosticsLog


def test_diagnostics_go_to_csv_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = Shampoo(model.parameters(), precondition_frequency=2, start_preconditioning_step=2)
    log = DiagnosticsLog(str(tmp_path / "diagnostics.csv"), str(tmp_path / "tb"))
    run = dict(task="t", optimizer="shampoo", lr=0.01, seed=0)
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
        log.log(opt, run, step)
    log.log(torch.optim.AdamW(model.parameters()), run, 6)  # not Shampoo: nothing logged
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "diagnostics.csv")))
    assert len(rows) == 5 * 4  # 5 points × (2 matrices × 2 axes)
    last = [r for r in rows if r["step"] == "5"]
    assert all(r["has_root"] == "True" and r["method"] == "eigh/fp32" for r in last)
    assert {r["staleness"] for r in last} == {"1"}  # roots from step 4, now at step 5
    assert float(last[0]["residual"]) < 0.1 and float(last[0]["lambda_max"]) > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
