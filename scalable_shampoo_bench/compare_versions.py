"""The optimizer step of this library against another copy of it, interleaved in one process.

For a refactor that must not slow the step: copy the old ``src/scalable_shampoo`` to a
folder as a package named ``scalable_shampoo_base`` (``git worktree add OLD REV && cp -r
OLD/src/scalable_shampoo DIR/scalable_shampoo_base``), then::

    python -m scalable_shampoo_bench.compare_versions --base DIR --threads 1

Both optimizers step copies of the same model with the same fixed gradients; the steps
alternate in chunks (A B B A …), and the JSON records medians, means and their ratios
(this library ÷ the base), plus whether the two copies' parameters stayed bitwise equal.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import sys
from typing import Any

import torch

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.step_time.models import make_model, set_fixed_grads
from scalable_shampoo_bench.step_time.timing import interleave, summarize

CONFIGS = [("linear4", 1024), ("linear4", 256), ("chargpt", 256), ("transformer", 256), ("resnet", 256),
           ("embedding", 256)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="folder holding the package scalable_shampoo_base")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each (≥ 2 root periods)")
    ap.add_argument("--frequency", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny models, for the smoke test")
    ap.add_argument("--configs", default=None, help="comma list of model:block (default: every one of CONFIGS)")
    ap.add_argument("--out", default="scalable_shampoo_bench/results/compare_versions.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.base)
    base_cls = importlib.import_module("scalable_shampoo_base").Shampoo
    device = torch.device("cpu")
    records: list[dict[str, Any]] = []
    configs = CONFIGS
    if args.configs:
        configs = [(m, int(b)) for m, b in (c.split(":") for c in args.configs.split(","))]
    for name, block in configs:
        model = make_model(name, args.quick, device)
        twin = copy.deepcopy(model)
        set_fixed_grads(model, 1)
        set_fixed_grads(twin, 1)
        kw = dict(lr=1e-3, block_size=block, precondition_frequency=args.frequency, start_preconditioning_step=1)
        new, old = Shampoo(model.parameters(), **kw), base_cls(twin.parameters(), **kw)
        new.step(), old.step()  # warm-up: first roots, buckets
        t_new, t_old = interleave(new.step, old.step, args.steps, args.frequency, device)
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
        a, b = summarize(t_new), summarize(t_old)
        rec = {"model": name, "block_size": block, "this": a, "base": b, "bitwise_equal": same,
               "median_ratio": round(a["median_ms"] / b["median_ms"], 4),
               "mean_ratio": round(a["mean_ms"] / b["mean_ms"], 4)}  # fmt: skip
        print(f"{name:12s} block {block:5d}: median {a['median_ms']:9.2f} vs {b['median_ms']:9.2f} ms "
              f"(×{rec['median_ratio']:.3f}), mean ×{rec['mean_ratio']:.3f}, bitwise: {same}", flush=True)  # fmt: skip
        records.append(rec)
    out = {"threads": args.threads, "steps": args.steps, "frequency": args.frequency, "quick": args.quick,
           "torch": torch.__version__, "machine": platform.machine(), "records": records}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
