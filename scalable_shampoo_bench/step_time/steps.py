"""Shampoo against AdamW, interleaved: the optimizer step alone (fixed gradients), and end to end."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scalable_shampoo import Shampoo

from .flops import step_flops
from .models import e2e_loss, e2e_shape, make_model, model_dims, set_fixed_grads
from .opts import block_counts, make_adamw, make_shampoo, root_counts, shampoo_options
from .profiling import profile_steps
from .timing import is_root_step, ms, ratios, summarize, timed_pair


def _settings(block_size: int, frequency: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "block_size": block_size,
        "precondition_frequency": frequency,
        "start_preconditioning_step": args.start_step,
        "warmup_steps": args.warmup,
        "measured_steps": args.periods * frequency,
        "chunk": args.chunk,
    }


def _against_adamw(
    record: dict[str, Any],
    model: nn.Module,
    shampoo: Shampoo,
    run_shampoo: Callable[[], object],
    run_adamw: Callable[[], object],
    args: argparse.Namespace,
    device: torch.device,
    adamw: torch.optim.Optimizer,
) -> None:
    """Time the two interleaved; fill ``record`` with the load, summaries, ratios, counts and raw times."""
    n, frequency = record["measured_steps"], record["precondition_frequency"]
    ta, tb, first = timed_pair(
        run_shampoo, run_adamw, args.warmup, n, args.chunk, device, record, lambda: shampoo.global_step + 1
    )
    spikes = [is_root_step(s, args.start_step, frequency) for s in range(first, first + n)]
    record["shampoo"] = summarize(ta, spikes)
    record["adamw"] = summarize(tb)
    record.update(ratios(record["shampoo"], record["adamw"]))
    record.update(root_counts(shampoo))
    record.update(block_counts(model, shampoo))
    record.update(live_memory(shampoo, adamw))
    record["raw_ms"] = {"shampoo": [ms(t) for t in ta], "adamw": [ms(t) for t in tb], "first_shampoo_step": first}


def live_memory(shampoo: Shampoo, adamw: torch.optim.Optimizer) -> dict[str, Any]:
    """The bytes each optimizer holds between steps, after the measured steps: Shampoo's
    ``memory()`` by kind (it equals the live tensor bytes the optimizer holds; the library's
    tests check it) and its total without the parameters, and AdamW's state tensors."""
    mem = shampoo.memory()
    adamw_bytes = sum(t.untyped_storage().nbytes() for st in adamw.state.values() for t in st.values()
                      if torch.is_tensor(t))  # fmt: skip
    return {"shampoo_memory": mem, "shampoo_bytes": sum(v for k, v in mem.items() if k != "parameters"),
            "adamw_bytes": adamw_bytes}  # fmt: skip


# ---------------------------------------------------------------------------------------------- 1. step time
def bench_step_time(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """The optimizer step alone, on fixed gradients, Shampoo against AdamW on two copies of the model."""
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    set_fixed_grads(model_a, seed=1)
    set_fixed_grads(model_b, seed=1)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step, **shampoo_options(args))
    adamw = make_adamw(model_b)
    record: dict[str, Any] = {
        "model": name,
        "dims": model_dims(name, args.quick),
        "params": sum(p.numel() for p in model_a.parameters()),
        **_settings(block_size, frequency, args),
    }
    _against_adamw(record, model_a, shampoo, shampoo.step, adamw.step, args, device, adamw)
    record["step_gflop"] = round(step_flops(model_a, shampoo) / 1e9, 4)
    if args.profile:
        record["profile"] = profile_steps(shampoo, device, args.profile_steps, args.start_step, frequency)
    return record


# ---------------------------------------------------------------------------------------------- 2. end to end
def bench_end_to_end(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Forward + backward + step on a fixed batch of the model's own, Shampoo against AdamW."""
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    dims = model_dims(name, args.quick)
    shape = e2e_shape(name, args.quick, args)
    loss_of = e2e_loss(name, dims, shape, device)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step, **shampoo_options(args))
    adamw = make_adamw(model_b)

    def iteration(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()

        return run

    record: dict[str, Any] = {"model": name, "dims": dims, "batch": shape, **_settings(block_size, frequency, args)}
    _against_adamw(
        record, model_a, shampoo, iteration(model_a, shampoo), iteration(model_b, adamw), args, device, adamw
    )
    return record
