"""The optimizers compared, and the learning-rate schedule they share."""

from __future__ import annotations

import math

import torch
from torch import nn

from scalable_shampoo import Shampoo

OPTIMIZERS = ("shampoo", "adamw", "sgd", "shampoo_bf16roots")
SGD_WEIGHT_DECAY = 5e-4  # L2 (coupled), the usual value for SGD on image models


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``shampoo``: library defaults except lr and weight decay (AdamW's); ``adamw``: torch's AdamW;
    ``sgd``: SGD with Nesterov momentum 0.9; ``shampoo_bf16roots``: Shampoo with its roots
    stored in bf16 (``root_storage_dtype``), to measure what that costs in loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "shampoo":
        return Shampoo(params, lr=lr, weight_decay=weight_decay)
    if name == "shampoo_bf16roots":
        return Shampoo(params, lr=lr, weight_decay=weight_decay, root_storage_dtype=torch.bfloat16)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=SGD_WEIGHT_DECAY)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """The lr multiplier at ``step`` (0-based): linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(100, total // 20))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
