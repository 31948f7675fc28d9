"""Where a Shampoo step's time goes: torch.profiler's top ops by self time, per step."""

from __future__ import annotations

from typing import Any

import torch

from scalable_shampoo import Shampoo

from .timing import is_root_step, sync


def _top_ops(prof: Any, steps: int, top: int = 12) -> dict[str, Any]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    steps = max(steps, 1)
    rows = [
        {
            "op": e.key,
            "calls_per_step": round(e.count / steps, 2),
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "self_share": round(e.self_cpu_time_total / total_self, 4),
        }
        for e in events[:top]
    ]
    return {
        "steps": steps,
        "self_ms_per_step_total": round(total_self / 1e3 / steps, 3),
        "ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "top_ops": rows,
    }


def profile_steps(
    opt: Shampoo, device: torch.device, steps: int, start: int, frequency: int, root_step: bool = True
) -> dict[str, Any]:
    """The top ops by self time over ``steps`` non-root Shampoo steps, then over one root step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    while is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    done = 0
    with profile(activities=activities) as prof:
        while done < steps and not is_root_step(opt.global_step + 1, start, frequency):
            opt.step()
            done += 1
    sync(device)
    out = _top_ops(prof, done)
    if not root_step:
        return out
    while not is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    with profile(activities=activities) as prof:
        opt.step()
    sync(device)
    out["root_step"] = _top_ops(prof, 1)
    return out
