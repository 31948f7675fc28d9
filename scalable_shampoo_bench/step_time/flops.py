"""The FLOP bound: a Shampoo step's matmul FLOPs over the GEMM rate measured in the same run."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.kronecker import SPLIT_DIM

from .timing import ms, timed


def step_flops(model: nn.Module, opt: Shampoo) -> float:
    """Matmul FLOPs of one step's statistics and preconditioning, over every preconditioned block.

    A block with ``N`` entries and a statistic on axis ``a`` (length ``n_a``) costs
    ``2·N·n_a`` for ``G₍ₐ₎G₍ₐ₎ᵀ`` and ``2·N·n_a`` for contracting G with the root:
    ``4·N·Σₐ n_a`` (for an m×n matrix, ``4mn(m + n)``). A statistic of at least
    ``kronecker.SPLIT_DIM`` is computed by quarters, three of the four: ``1.5·N·n_a``.
    """
    group = opt.param_groups[0]
    flops = 0.0
    for p in model.parameters():
        for block in opt.plan(p, group).blocks:
            numel = 1
            for n in block.shape:
                numel *= n
            for a in block.axes:
                n_a = block.shape[a]
                flops += (1.5 if n_a >= SPLIT_DIM else 2.0) * numel * n_a + 2.0 * numel * n_a
    return flops


def gemm_rate(n: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """GFLOP/s of an n×n fp32 matmul (2n³ FLOPs), median of ``repeats``."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    ts = [timed(lambda: torch.matmul(a, b, out=out), device) for _ in range(repeats)]
    med = statistics.median(ts)
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "median_ms": ms(med),
        "gflops": round(2.0 * n**3 / med / 1e9, 2),
        "best_gflops": round(2.0 * n**3 / min(ts) / 1e9, 2),
    }


def flop_bounds(steps: list[dict[str, Any]], gemm: dict[int, dict[str, Any]], ref_n: int) -> list[dict[str, Any]]:
    """Measured Shampoo step against matmul FLOPs ÷ the measured GEMM rate."""
    out = []
    for r in steps:
        gflop = r["step_gflop"]
        rate = gemm[ref_n]["gflops"]
        bound_ms = 1e3 * gflop / rate
        block_n = min(gemm, key=lambda k: abs(k - r["block_size"]))  # GEMM rate at the block's size
        bound_block_ms = 1e3 * gflop / gemm[block_n]["gflops"]
        sh = r["shampoo"]
        out.append(
            {
                "model": r["model"],
                "block_size": r["block_size"],
                "precondition_frequency": r["precondition_frequency"],
                "step_gflop": gflop,
                "gemm_n": ref_n,
                "gemm_gflops": rate,
                "bound_ms": round(bound_ms, 3),
                "gemm_n_at_block": block_n,
                "bound_ms_at_block_gemm": round(bound_block_ms, 3),
                "shampoo_nonroot_median_ms": sh["nonroot_median_ms"],
                "shampoo_mean_ms": sh["mean_ms"],
                "adamw_median_ms": r["adamw"]["median_ms"],
                "nonroot_median_over_bound": round(sh["nonroot_median_ms"] / bound_ms, 3),
                "mean_over_bound": round(sh["mean_ms"] / bound_ms, 3),
                "achieved_gflops_nonroot": round(gflop / (sh["nonroot_median_ms"] / 1e3), 2),
            }
        )
    return out
