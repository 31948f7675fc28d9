"""The optimizers compared, and the learning-rate schedule they share."""

from __future__ import annotations

import ast
import math
from typing import Any

import torch
from torch import nn

from scalable_shampoo import BackgroundRoots, Shampoo, param_groups_for

OPTIMIZERS = ("shampoo", "adamw", "sgd", "shampoo_bf16roots", "shampoo_full_tables")
SGD_WEIGHT_DECAY = 5e-4  # L2 (coupled), the usual value for SGD on image models


def shampoo_variant(name: str) -> dict[str, Any] | None:
    """``shampoo[key=value;key=value]`` → Shampoo's keyword arguments (None for any other name).

    For knob investigations: ``--optimizers "shampoo,shampoo[precondition_frequency=10]"``.
    Values are Python literals (``block_size=256``, ``betas=(0.9,0.99)``). Three keys are
    not Shampoo's: ``scheduler='latency'`` or ``'deterministic'`` computes the roots (or
    bases) on a background thread (``BackgroundRoots``), with ``max_staleness`` (default
    ``precondition_frequency``) or ``delay`` (default 1) beside it (see :func:`make_optimizer`).
    """
    if not (name.startswith("shampoo[") and name.endswith("]")):
        return None
    out: dict[str, Any] = {}
    for item in filter(None, name[len("shampoo[") : -1].split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"optimizer {name!r}: expected shampoo[key=value;…], got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"optimizer {name!r}: {key.strip()}={value.strip()!r} is not a Python literal") from None
    return out


def is_known(name: str) -> bool:
    return name in OPTIMIZERS or shampoo_variant(name) is not None


def make_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float, *, embedding_groups: bool = False
) -> torch.optim.Optimizer:
    """``shampoo``: library defaults except lr and weight decay (AdamW's); ``adamw``: torch's AdamW;
    ``sgd``: SGD with Nesterov momentum 0.9; ``shampoo_bf16roots``: Shampoo with its roots
    stored in bf16 (``root_storage_dtype``), to measure what that costs in loss.

    ``embedding_groups`` (the ctr tasks): every Shampoo variant gets its params from
    ``param_groups_for(model)``, so embedding tables are preconditioned on their d side
    only; ``shampoo_full_tables`` is Shampoo without it (every axis ≤ 4096 keeps a statistic).
    A variant's ``embedding_axes`` goes to ``param_groups_for`` (``shampoo[embedding_axes=()]``:
    the tables keep no statistic and take the grafting update alone)."""
    params: list[Any] = [p for p in model.parameters() if p.requires_grad]
    if name == "shampoo_full_tables":
        return Shampoo(params, lr=lr, weight_decay=weight_decay)
    variant = shampoo_variant(name)
    axes = variant.pop("embedding_axes", (-1,)) if variant is not None else (-1,)
    if variant is not None and axes != (-1,) and not embedding_groups:
        raise ValueError(f"optimizer {name!r}: embedding_axes applies only to tasks with embedding groups (ctr)")
    if embedding_groups:
        params = param_groups_for(model, embedding_axes=axes)
    if name == "shampoo":
        return Shampoo(params, lr=lr, weight_decay=weight_decay)
    if variant is not None:
        return Shampoo(params, **{"lr": lr, "weight_decay": weight_decay, **_with_scheduler(variant)})
    if name == "shampoo_bf16roots":
        return Shampoo(params, lr=lr, weight_decay=weight_decay, root_storage_dtype=torch.bfloat16)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=SGD_WEIGHT_DECAY)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _with_scheduler(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's ``scheduler='latency'|'deterministic'`` (+ ``max_staleness``/``delay``) as a
    ``BackgroundRoots`` on one thread worker; other keys pass through to Shampoo."""
    kw = dict(variant)
    mode = kw.pop("scheduler", None)
    staleness, delay = kw.pop("max_staleness", None), kw.pop("delay", 1)
    if mode is None:
        if staleness is not None or "delay" in variant:
            raise ValueError("max_staleness and delay go with scheduler='latency' or 'deterministic'")
        return kw
    if mode not in ("latency", "deterministic"):
        raise ValueError(f"scheduler must be 'latency' or 'deterministic', got {mode!r}")
    every = kw.get("precondition_frequency", Shampoo.group_defaults()["precondition_frequency"])
    staleness = every if staleness is None else staleness
    kw["scheduler"] = BackgroundRoots(mode, delay=delay, max_staleness=staleness, workers="thread")
    return kw


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """The lr multiplier at ``step`` (0-based): linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(100, total // 20))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
