"""Inverse p-th roots of symmetric positive semi-definite matrices.

Every function here is pure: it returns new tensors and never writes to its
input (an earlier PyTorch port of Shampoo added ε to the statistics in place
and drifted). All functions take a batch ``[..., n, n]`` of matrices.

Both methods compute the same matrix function, ``(A + ε_eff·I)^(-1/p)``:

* ``ε_eff = ε·λ_max(A)`` when ε is relative (the default), which caps the
  condition number near 1/ε; ``ε_eff = ε`` when it is absolute.
* **Coupled Newton** (Guo & Higham 2006), the paper's method, uses only
  matrix products and suits GPUs.
* **eigh** (``torch.linalg.eigh``) floors the eigenvalues of ``A + ε_eff·I`` at
  ``ε_eff`` and rebuilds ``Q·diag(λ^(-1/p))·Qᵀ``; it is the faster method on a
  CPU (see the README's measurements).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

__all__ = [
    "RootMethod",
    "fallback_chain",
    "RootResult",
    "coupled_newton_inverse_root",
    "eigh_inverse_root",
    "inverse_root",
    "matrix_power",
    "max_eigenvalue",
    "root_residual",
]


class RootMethod(str, Enum):
    """How inverse p-th roots are computed."""

    EIGH = "eigh"
    NEWTON = "newton"
    AUTO = "auto"  # eigh on a CPU, coupled Newton on an accelerator (measured)

    def resolve(self, device: torch.device) -> RootMethod:
        if self is not RootMethod.AUTO:
            return self
        return RootMethod.EIGH if device.type == "cpu" else RootMethod.NEWTON


@dataclass(frozen=True)
class RootResult:
    """Roots of a batch of matrices, with what is needed to judge them.

    ``root``: ``[..., n, n]``; the other fields are ``[...]``.
    ``residual`` is ``max|X^p·A·V − V|`` on four fixed probe vectors V, where A is
    A_d for Newton and, for eigh, A_d with its eigenvalues floored at ε_eff.
    ``ok`` is False where no stage of the fallback chain gave a finite root with
    a residual under the threshold, or the matrix was zero under a relative ε
    (nothing to invert); ``stage`` indexes ``stages``, -1 where ``ok`` is False.
    """

    root: Tensor
    residual: Tensor
    eps: Tensor
    lambda_max: Tensor
    ok: Tensor
    stage: Tensor
    stages: tuple[str, ...]


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)


def max_eigenvalue(a: Tensor, iters: int = 16) -> Tensor:
    """λ_max of PSD matrices by power iteration, ``[..., n, n] → [...]``.

    The estimate is a Rayleigh quotient, so it never exceeds λ_max; it is
    raised to the largest diagonal entry, which bounds λ_max from below too, so a
    start vector orthogonal to the top eigenvector cannot return 0.
    """
    n = a.shape[-1]
    v = torch.linspace(1.0, 2.0, n, dtype=a.dtype, device=a.device)
    v = (v / v.norm()).expand(*a.shape[:-1]).unsqueeze(-1)
    for _ in range(iters):
        w = a @ v
        v = w / w.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    rayleigh = (v.transpose(-1, -2) @ a @ v)[..., 0, 0]
    return torch.maximum(rayleigh, a.diagonal(dim1=-2, dim2=-1).amax(-1))


def matrix_power(a: Tensor, p: int) -> Tensor:
    """``a^p`` for an integer ``p ≥ 1`` by repeated squaring."""
    result: Tensor | None = None
    base = a
    while True:
        if p & 1:
            result = base if result is None else result @ base
        p >>= 1
        if not p:
            assert result is not None
            return result
        base = base @ base


def root_residual(root: Tensor, a_damped: Tensor, p: int) -> Tensor:
    """``max|X^p·A_d − I|`` per matrix: 0 for an exact root, scale-free (n³ work; for tests)."""
    return (matrix_power(root, p) @ a_damped - _eye_like(a_damped)).abs().amax((-2, -1))


def _probes(a: Tensor, k: int = 4) -> Tensor:
    """k fixed, dense probe vectors ``[n, k]`` with entries in [-1, 1]."""
    n = a.shape[-1]
    i = torch.arange(n, dtype=a.dtype, device=a.device)[:, None]
    j = torch.arange(1, k + 1, dtype=a.dtype, device=a.device)
    return torch.cos(0.7 * i * j + 0.3 * j)


def probe_residual(root: Tensor, a_v: Tensor, v: Tensor, p: int) -> Tensor:
    """``max|X^p·(A·V) − V|`` for probe vectors V, given ``A·V``: the residual of the
    root at a cost of (p+1) matrix–vector products per probe instead of n³ work."""
    r = a_v
    for _ in range(p):
        r = root @ r
    return (r - v).abs().amax((-2, -1))


def eigh_inverse_root(a_damped: Tensor, p: float, eps: Tensor) -> Tensor:
    """``A_d^(-1/p)`` by eigendecomposition, eigenvalues floored at ``eps`` (``[...]``)."""
    return _eigh_root(a_damped, p, eps)[0]


def _eigh_root(a_damped: Tensor, p: float, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lam, q = torch.linalg.eigh(a_damped)
    lam = torch.maximum(lam, eps.unsqueeze(-1))
    return (q * lam.pow(-1.0 / p).unsqueeze(-2)) @ q.transpose(-1, -2), lam, q


def coupled_newton_inverse_root(a_damped: Tensor, p: int, max_iters: int = 100, tol: float = 1e-6) -> Tensor:
    """``A_d^(-1/p)`` by the coupled Newton iteration (Guo & Higham 2006).

    z = (1+p)/(2‖A_d‖_F), M₀ = z·A_d, X₀ = z^(1/p)·I; then
    T = ((p+1)I − M)/p, X ← X·T, M ← T^p·M, until max|M − I| ≤ tol, or
    ``max_iters``, or the error grows 1.2× in one step (then the previous X
    is kept). Each matrix of the batch stops on its own.
    """
    eye = _eye_like(a_damped)
    z = (1 + p) / (2 * torch.linalg.matrix_norm(a_damped)).clamp_min(torch.finfo(a_damped.dtype).tiny)
    z = z[..., None, None]
    m = z * a_damped
    x = z.pow(1.0 / p) * eye
    err = (m - eye).abs().amax((-2, -1))
    active = err > tol
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        t = ((p + 1) * eye - m) / p
        x_new = x @ t
        m_new = matrix_power(t, p) @ m
        err_new = (m_new - eye).abs().amax((-2, -1))
        accept = active & (err_new <= 1.2 * err) & torch.isfinite(err_new)
        x = torch.where(accept[..., None, None], x_new, x)
        m = torch.where(accept[..., None, None], m_new, m)
        err = torch.where(accept, err_new, err)
        active = accept & (err_new > tol)
    return x


def _one_attempt(
    a: Tensor, p: int, eps: float, relative: bool, method: RootMethod, max_iters: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lam_max = max_eigenvalue(a)
    eps_eff = eps * lam_max if relative else torch.full_like(lam_max, eps)
    a_damped = a + eps_eff[..., None, None] * _eye_like(a)
    v = _probes(a)
    if method is RootMethod.NEWTON:
        root = coupled_newton_inverse_root(a_damped, p, max_iters=max_iters, tol=tol)
        a_v = a_damped @ v
    else:
        try:
            root, lam, q = _eigh_root(a_damped, p, eps_eff)
            # judged against the matrix it inverts: A_d with rounding's negative
            # eigenvalues floored at ε_eff (the regularisation ε is there for)
            a_v = q @ (lam.unsqueeze(-1) * (q.transpose(-1, -2) @ v))
        except torch.linalg.LinAlgError:  # did not converge: report every matrix as failed
            root = torch.full_like(a, float("nan"))
            a_v = torch.full_like(a_damped @ v, float("nan"))
    residual = probe_residual(root, a_v, v, p)
    return root, residual, eps_eff, lam_max


def fallback_chain(
    method: RootMethod, dtype: torch.dtype, eps: float, retries: int
) -> list[tuple[str, RootMethod, torch.dtype, float]]:
    """The documented order of attempts: (name, method, dtype, ε).

    The chosen method in the chosen precision; then eigh in that precision
    (if the first was Newton); then eigh in fp64; then eigh in fp64 with ε×10,
    ×100, … (``retries`` times). A matrix that fails every stage keeps its
    previous root.
    """

    def name(m: RootMethod, d: torch.dtype, k: int) -> str:
        return f"{m.value}/{'fp64' if d == torch.float64 else 'fp32'}" + (f"/eps×1e{k}" if k else "")

    stages = [(method, dtype, 0)]
    if method is RootMethod.NEWTON:
        stages.append((RootMethod.EIGH, dtype, 0))
    if dtype != torch.float64:
        stages.append((RootMethod.EIGH, torch.float64, 0))
    stages += [(RootMethod.EIGH, torch.float64, k) for k in range(1, retries + 1)]
    return [(name(m, d, k), m, d, eps * 10.0**k) for m, d, k in stages]


def inverse_root(
    a: Tensor,
    p: int,
    *,
    eps: float = 1e-6,
    relative_eps: bool = True,
    method: RootMethod | str = RootMethod.AUTO,
    dtype: torch.dtype | None = None,
    max_residual: float = 0.5,
    retries: int = 3,
    newton_max_iters: int = 100,
    newton_tol: float | None = None,
) -> RootResult:
    """``(A + ε_eff·I)^(-1/p)`` for a batch of PSD matrices, judged, with fallbacks.

    The computation runs in ``dtype`` (default: the input's) and the root is
    returned in the input's dtype. A root that is non-finite or whose residual
    exceeds ``max_residual`` goes down :func:`fallback_chain`; ``stage`` tells
    which stage each matrix's root came from (-1: none, ``ok`` is False). The
    Newton tolerance defaults to 1e-6 in fp32 and 1e-12 in fp64.
    """
    if p < 1 or int(p) != p:
        raise ValueError(f"p must be a positive integer, got {p!r}")
    chain = fallback_chain(RootMethod(method).resolve(a.device), dtype or a.dtype, eps, retries)
    batch, n = a.shape[:-2], a.shape[-1]
    flat = a.reshape(-1, n, n)
    root = torch.full_like(flat, float("nan"))
    residual = torch.full(flat.shape[:1], float("inf"), dtype=torch.float64, device=a.device)
    eps_eff = torch.zeros_like(residual)
    lam_max = max_eigenvalue(flat.to(dtype or a.dtype)).double()
    stage = torch.full(flat.shape[:1], -1, dtype=torch.int64, device=a.device)
    todo = torch.isfinite(lam_max) & ((lam_max > 0) if relative_eps else torch.ones_like(lam_max, dtype=torch.bool))
    for i, (_, m, d, e) in enumerate(chain):
        if not bool(todo.any()):
            break
        tol = newton_tol if newton_tol is not None else (1e-12 if d == torch.float64 else 1e-6)
        idx = todo.nonzero().squeeze(1)
        r, res, e_eff, _ = _one_attempt(flat[idx].to(d), p, e, relative_eps, m, newton_max_iters, tol)
        good = torch.isfinite(res) & (res <= max_residual) & torch.isfinite(r).all(-1).all(-1)
        residual[idx], eps_eff[idx] = res.double(), e_eff.double()
        root[idx[good]] = r[good].to(a.dtype)
        stage[idx[good]] = i
        todo[idx[good]] = False
    ok = stage >= 0
    root, residual, eps_eff, lam_max = (
        root.reshape(a.shape),
        residual.reshape(batch),
        eps_eff.reshape(batch),
        lam_max.reshape(batch),
    )
    ok, stage = ok.reshape(batch), stage.reshape(batch)
    return RootResult(root, residual, eps_eff, lam_max, ok, stage, tuple(c[0] for c in chain))
