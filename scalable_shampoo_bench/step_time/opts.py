"""The optimizers under test, as every measurement builds them, and what their state says afterwards."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn

from scalable_shampoo import Shampoo
from scalable_shampoo.blocks import BlockPlan, make_plan
from scalable_shampoo.state import RootInfo


def shampoo_options(args: argparse.Namespace) -> dict[str, Any]:
    """Shampoo options beyond the defaults, from ``--compile-elementwise`` and ``--bf16-roots``."""
    out: dict[str, Any] = {}
    if getattr(args, "compile_elementwise", False):
        out["compile_elementwise"] = True
    if getattr(args, "bf16_roots", False):
        out["root_storage_dtype"] = torch.bfloat16
    if getattr(args, "format1_merge", False):
        out["format1_merge"] = True
    return out


class Format1MergeShampoo(Shampoo):
    """Shampoo planned with format 1's merge rule (dims merged from the left), to time
    what fan-in grouping changed; every stage of the step takes its plan from ``plan``."""

    @staticmethod
    def plan(p: Tensor, group: dict[str, Any]) -> BlockPlan:
        bound = group["merge_dims_bound"] or group["block_size"]
        return make_plan(
            tuple(p.shape), group["block_size"], group["max_preconditioner_dim"], bound, group["precondition_1d"],
            None, "left",
        )  # fmt: skip


def make_shampoo(
    model: nn.Module, block_size: int, frequency: int, start: int, batched: bool = True, **options: Any
) -> Shampoo:
    cls = Format1MergeShampoo if options.pop("format1_merge", False) else Shampoo
    return cls(
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
                rejected += int(RootInfo.from_tensor(value).rejected)
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
