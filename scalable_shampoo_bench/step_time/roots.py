"""The cost of one inverse root: eigh against coupled Newton, with and without ``inverse_root``'s checks."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from scalable_shampoo.matrix_roots import (
    coupled_newton_inverse_root,
    eigh_inverse_root,
    inverse_root,
    max_eigenvalue,
    root_residual,
)

from .timing import measured_load, ms, timed

ROOT_P = 4


def spd_matrix(n: int, spectrum: str, device: torch.device, seed: int = 3) -> Tensor:
    """``G Gᵀ/m`` plus a small ridge (1e-6 of the mean eigenvalue), fp32.

    ``square``: G is n×n, so the spectrum is Marchenko–Pastur at ratio 1, reaching
    down to ~0 (condition number ~1e6 after the ridge), like a young statistic.
    ``tall``: G is n×4n, a well-conditioned statistic (condition number ~9).
    """
    m = {"square": n, "tall": 4 * n}[spectrum]
    gen = torch.Generator().manual_seed(seed + n)
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    a = g @ g.T / m
    a += 1e-6 * a.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    return a.to(device=device, dtype=torch.float32)


class _MatmulCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.matmul, Tensor.__matmul__, Tensor.matmul, torch.mm, torch.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def newton_iterations(a_damped: Tensor) -> int:
    """Iterations coupled Newton takes on ``a_damped`` (p=4: four matmuls per iteration)."""
    with _MatmulCounter() as counter:
        coupled_newton_inverse_root(a_damped, ROOT_P)
    return counter.count // 4


def bench_roots(
    sizes: Sequence[int], spectra: Sequence[str], threads: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    out = []
    for spectrum in spectra:
        for n in sizes:
            a = spd_matrix(n, spectrum, device)
            lam = max_eigenvalue(a)
            eps = 1e-6 * lam  # inverse_root's default: ε relative to λ_max
            a_d = a + eps * torch.eye(n, device=device)
            fns: dict[str, Callable[[], object]] = {
                "eigh": partial(inverse_root, a, ROOT_P, method="eigh"),
                "newton": partial(inverse_root, a, ROOT_P, method="newton"),
                "eigh_raw": partial(eigh_inverse_root, a_d, ROOT_P, eps),
                "newton_raw": partial(coupled_newton_inverse_root, a_d, ROOT_P),
            }
            record: dict[str, Any] = {"n": n, "p": ROOT_P, "spectrum": spectrum, "threads": threads}
            times: dict[str, list[float]] = {k: [] for k in fns}
            with measured_load(record):
                for fn in fns.values():  # warm-up
                    fn()
                for _ in range(repeats):  # interleaved repeats
                    for k, fn in fns.items():
                        times[k].append(timed(fn, device))
            for k, ts in times.items():
                record[k] = {"median_ms": ms(statistics.median(ts)), "min_ms": ms(min(ts)), "repeats": len(ts)}
            record["newton_over_eigh"] = round(record["newton"]["median_ms"] / record["eigh"]["median_ms"], 3)
            r_eigh = eigh_inverse_root(a_d, ROOT_P, eps)
            r_newton = coupled_newton_inverse_root(a_d, ROOT_P)
            record["residual_eigh"] = float(root_residual(r_eigh.double(), a_d.double(), ROOT_P))
            record["residual_newton"] = float(root_residual(r_newton.double(), a_d.double(), ROOT_P))
            record["eigh_vs_newton_rel_diff"] = float((r_eigh - r_newton).norm() / r_eigh.norm())
            record["newton_iterations"] = newton_iterations(a_d)
            eig = torch.linalg.eigvalsh(a_d.double())
            record["condition_number"] = float(eig[-1] / eig[0].clamp_min(1e-300))
            out.append(record)
    return out
