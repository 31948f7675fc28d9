"""Two Shampoo variants against each other, the step alone: batched against the plain per-block loop
(``--batched-compare``), ``compile_elementwise`` against eager (the ``compile`` section), or
``packed_storage`` against the default layout (the ``packed`` section)."""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from .flops import step_flops
from .models import make_model, model_dims, set_fixed_grads
from .opts import block_counts, make_shampoo, root_counts, shampoo_options
from .profiling import profile_steps
from .timing import is_root_step, ms, ratio_dict, summarize, timed_pair

# two Shampoo variants timed against each other: (label, options) of the fast one, then of the reference
PAIRS: dict[str, tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]] = {
    "batched": (("batched", {"batched": True}), ("plain", {"batched": False})),
    "compile": (("compiled", {"compile_elementwise": True}), ("eager", {"compile_elementwise": False})),
    "packed": (("packed", {"packed_storage": True}), ("full", {"packed_storage": False})),
}


def bench_batched(
    name: str, block_size: int, args: argparse.Namespace, device: torch.device, pair: str = "batched"
) -> dict[str, Any]:
    """Shampoo ``batched=True`` against ``batched=False`` (the plain per-block loop): the step alone, interleaved.

    ``pair="compile"``: ``compile_elementwise=True`` against the eager ``torch._foreach_*`` path instead.

    Fixed gradients, as in ``bench_step_time``. Roots are computed at the first
    (untimed) step and, with ``precondition_frequency = warmup + steps``, not again
    inside the window: the comparison is of the per-step work, which is what
    batching changes (the roots are the same eigh calls either way).
    """
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    set_fixed_grads(model_a, seed=1)
    set_fixed_grads(model_b, seed=1)
    n, warmup, start = args.batched_steps, args.warmup, 1
    frequency = warmup + n  # roots at step 1, next at step warmup + n + 1: after the window
    (label_a, opts_a), (label_b, opts_b) = PAIRS[pair]
    batched = make_shampoo(model_a, block_size, frequency, start, **{**shampoo_options(args), **opts_a})
    plain = make_shampoo(model_b, block_size, frequency, start, **{**shampoo_options(args), **opts_b})
    record: dict[str, Any] = {
        "pair": pair,
        "model": name,
        "dims": model_dims(name, args.quick),
        "params": sum(p.numel() for p in model_a.parameters()),
        "block_size": block_size,
        **block_counts(model_a, batched),
        "precondition_frequency": frequency,
        "start_preconditioning_step": start,
        "warmup_steps": warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    # warm-up, untimed: state allocation, stacking, the roots
    ta, tb, first = timed_pair(
        batched.step, plain.step, warmup, n, args.chunk, device, record, lambda: batched.global_step + 1
    )
    spikes = [is_root_step(s, start, frequency) for s in range(first, first + n)]
    record[label_a] = summarize(ta, spikes)
    record[label_b] = summarize(tb, spikes)
    # reference / fast: > 1 when the fast variant is faster
    ratios = ratio_dict(record[label_b], record[label_a])
    record.update({f"{label_b}_over_{label_a}_{k}": v for k, v in ratios.items()})
    counts = root_counts(batched)
    record["root_matrices"] = counts["root_matrices"]
    record["roots_rejected"] = {label_a: counts["roots_rejected"], label_b: root_counts(plain)["roots_rejected"]}
    with torch.no_grad():  # the two should take the same steps; a large value means they did not
        pairs = zip(model_a.parameters(), model_b.parameters(), strict=True)
        record["max_abs_param_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
    record["raw_ms"] = {label_a: [ms(t) for t in ta], label_b: [ms(t) for t in tb], "first_step": first}
    record["step_gflop"] = round(step_flops(model_a, batched) / 1e9, 4)  # the matmuls either variant must do
    if args.profile:  # where each variant's time goes (non-root steps)
        record["profile"] = {
            label: profile_steps(opt, device, args.profile_steps, start, frequency, root_step=False)
            for label, opt in ((label_a, batched), (label_b, plain))
        }
    return record


def batched_summary(records: list[dict[str, Any]], goal: float = 3.0) -> dict[str, Any]:
    """Blocks per model and block size, and the plain/batched ratio on the record with the most blocks."""
    top = max(records, key=lambda r: r["blocks"])
    blocks: dict[str, dict[str, int]] = {}
    for r in records:
        blocks.setdefault(r["model"], {})[str(r["block_size"])] = r["blocks"]
    return {
        "blocks": blocks,
        "most_blocks": {
            "model": top["model"],
            "block_size": top["block_size"],
            "blocks": top["blocks"],
            "plain_over_batched_median": top["plain_over_batched_median"],
            "plain_over_batched_mean": top["plain_over_batched_mean"],
        },
        "goal_plain_over_batched": goal,
        "goal_met": top["plain_over_batched_median"] >= goal,
    }
