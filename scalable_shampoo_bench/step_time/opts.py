"""The optimizers under test, as every measurement builds them, and what their state says afterwards."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from scalable_shampoo import Shampoo


def shampoo_options(args: argparse.Namespace) -> dict[str, Any]:
    """Shampoo options beyond the defaults, from ``--compile-elementwise`` and ``--bf16-roots``."""
    out: dict[str, Any] = {}
    if getattr(args, "compile_elementwise", False):
        out["compile_elementwise"] = True
    if getattr(args, "bf16_roots", False):
        out["root_storage_dtype"] = torch.bfloat16
    return out


def make_shampoo(
    model: nn.Module, block_size: int, frequency: int, start: int, batched: bool = True, **options: Any
) -> Shampoo:
    return Shampoo(
        model.parameters(),
        lr=1e-3,
        weight_decay=1e-2,
        block_size=block_size,
        precondition_frequency=frequency,
        start_preconditioning_step=start,
        batched=batched,
        **options,
    )


def make_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)


def root_counts(opt: Shampoo) -> dict[str, int]:
    """Roots installed and rejected so far, from the optimizer's state."""
    installed = rejected = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key.startswith("root."):
                installed += 1
            elif key.startswith("root_info."):
                rejected += int(value[4])
    return {"root_matrices": installed, "roots_rejected": rejected}


def block_counts(model: nn.Module, opt: Shampoo) -> dict[str, int]:
    """Blocks of the model under ``opt``'s plans: preconditioned ones (with a statistic), all, distinct shapes."""
    group = opt.param_groups[0]
    blocks = [b for p in model.parameters() for b in opt.plan(p, group).blocks]
    pre = [b for b in blocks if b.axes]
    return {
        "blocks": len(pre),
        "blocks_total": len(blocks),
        "block_shapes": len({(b.shape, b.axes) for b in pre}),
    }
