"""Statistic sizes under fan-in grouping against format 1's merge rule (from the left).

Counts only (no timing): per model and block size, the entries of all statistics
(Σ n²), the root work of one recomputation (Σ n³) and the parameters, from
``Shampoo.plan_table``; the largest statistic of each conv kernel too. The ctr DLRM
is counted with and without ``param_groups_for`` (tables on their d side only). And the
CNN's optimizer state in MB after two steps (roots installed), against AdamW's::

    python -m scalable_shampoo_bench.plan_sizes --out scalable_shampoo_bench/results/plan_sizes.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scalable_shampoo import Shampoo, param_groups_for

from .step_time.models import make_model
from .step_time.opts import Format1MergeShampoo


def _totals(opt: Shampoo, model: torch.nn.Module) -> dict[str, Any]:
    table = opt.plan_table(model)
    t = table.totals
    kernels = {r["name"]: [list(r["merged"]), r["statistic_sizes"][0][0] if r["statistic_sizes"] else 0]
               for r in table.rows if len(r["shape"]) == 4}  # fmt: skip
    return {**t, "statistics_over_parameters": t["statistics"] / t["numel"], "kernels": kernels}


def _state_mb(opt: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    """Optimizer state after two steps on random gradients, roots included, in MB (10⁶ bytes)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for q in model.parameters():
            q.grad = torch.randn(q.shape, generator=gen) * 1e-2
        opt.step()
    if isinstance(opt, Shampoo):
        mem = opt.memory()
        return sum(v for k, v in mem.items() if k not in ("parameters", "scratch")) / 1e6
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t)) / 1e6  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="plan_sizes.json")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"models": {}}
    for name in ("resnet", "cnn"):
        for block in (1024, 256):
            model = make_model(name, False, torch.device("cpu"))
            out["models"][f"{name}/block{block}"] = {
                "fan_in": _totals(Shampoo(model.parameters(), block_size=block), model),
                "format1_left": _totals(Format1MergeShampoo(model.parameters(), block_size=block), model),
            }
    model = make_model("cnn", False, torch.device("cpu"))
    out["state_mb_cnn_block1024"] = {
        "adamw": _state_mb(torch.optim.AdamW(model.parameters()), model),
        "fan_in": _state_mb(Shampoo(model.parameters(), start_preconditioning_step=1), model),
        "format1_left": _state_mb(Format1MergeShampoo(model.parameters(), start_preconditioning_step=1), model),
    }
    print("optimizer state (MB, statistics + roots + moments, no scratch), cnn:", out["state_mb_cnn_block1024"])
    from .tasks import TASKS

    torch.manual_seed(0)
    dlrm = TASKS["ctr"].build(False, torch.device("cpu")).model
    out["models"]["ctr_dlrm/block1024"] = {
        "param_groups_for": _totals(Shampoo(param_groups_for(dlrm)), dlrm),
        "all_axes": _totals(Shampoo(dlrm.parameters()), dlrm),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["models"].items():
        print(k, {name: (t["statistics"], f"{t['statistics_over_parameters']:.2f}x", f"{t['root_flops']:.3g}")
                  for name, t in v.items()})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
