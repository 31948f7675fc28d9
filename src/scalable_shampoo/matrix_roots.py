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

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

__all__ = [
    "RootMethod",
    "fallback_chain",
    "RootResult",
    "coupled_newton_inverse_root",
    "eigenbasis",
    "eigh_inverse_root",
    "inverse_root",
    "matrix_power",
    "max_eigenvalue",
    "power_step_basis",
    "root_power",
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


_LN2_HI = 6.93147180369123816490e-01  # ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has 21 zero low bits,
_LN2_LO = 1.90821492927058770002e-10  # so k·_LN2_HI is exact for |k| < 2^21
_ATANH_TERMS = 12  # ln m = 2·atanh(s), |s| ≤ 0.1716: the next term is below 1e-19 relative
_EXP_TERMS = 16  # eᶠ, |f| ≤ ln2/2: the next term is below 1e-20


def _pow2(n: Tensor) -> Tensor:
    """``2^n`` as float64 from its bits, for integers ``-1022 ≤ n ≤ 1023``: exact."""
    return ((n + 1023) << 52).view(torch.float64)


def root_power(x: Tensor, p: int, sign: int = -1) -> Tensor:
    """``x^(±1/p)`` elementwise, for ``x ≥ 0`` and an integer ``p ≥ 1``, from exactly
    rounded operations only, so that each element's value depends on that element alone.

    ``torch.pow`` on a CPU does not have this property: its kernel runs the full
    vector-width chunks of a tensor through SLEEF and the remainder (and each
    thread's ragged chunk edge) through the C library, which round differently in
    about 1% of the cases. The same eigenvalue then gets a different power, and
    its matrix a different root, depending on which other matrices share its batch,
    i.e. on how the root work was batched or split across ranks.

    Here: x = m·2^k (``frexp``), k = p·q + r with 0 ≤ r < p, so
    x^(±1/p) = 2^(±q)·exp(±(r·ln2 + ln m)/p), with ln m = 2·atanh((m−1)/(m+1)) and
    exp by range reduction and series, in float64 (about 1 unit in the last place
    of float64; a float32 result is then the correctly rounded one but within
    ~1e-8 ulp of a tie). Sums, products, quotients, ``frexp`` and bit operations
    give the same result in every SIMD lane and every scalar tail. 0 ↦ ∞ (0 for
    +1/p), ∞ ↦ 0 (∞ for +1/p), negative or NaN ↦ NaN. Returned in ``x``'s dtype.
    """
    if isinstance(p, bool) or int(p) != p or p < 1 or sign not in (-1, 1):
        raise ValueError(f"p must be a positive integer and sign ±1, got p={p!r}, sign={sign!r}")
    p = int(p)
    d = x.double()
    finite_pos = torch.isfinite(d) & (d > 0)
    d = torch.where(finite_pos, d, 1.0)
    tiny = d < 2.0**-1000  # frexp needs a normal number: scale subnormals up, exactly
    d = torch.where(tiny, d * 2.0**600, d)
    m, k32 = torch.frexp(d)  # d = m·2^k, m ∈ [0.5, 1)
    low = m < 0.7071067811865476  # m ∈ [√½, √2), so |s| ≤ 0.1716 below
    m = torch.where(low, m * 2.0, m)
    k = k32.to(torch.int64) - low.to(torch.int64) - tiny.to(torch.int64) * 600
    q = torch.div(k, p, rounding_mode="floor")
    r = (k - q * p).double()  # 0 ≤ r < p
    s = (m - 1.0).div_(m + 1.0)  # m − 1 is exact
    s2 = s * s
    acc = torch.full_like(s, 1.0 / (2 * _ATANH_TERMS - 1))
    for j in range(_ATANH_TERMS - 2, -1, -1):
        acc.mul_(s2).add_(1.0 / (2 * j + 1))
    ln_m = acc.mul_(s).mul_(2.0)
    t = (r * _LN2_LO).add_(ln_m).add_(r * _LN2_HI).div_(float(p))  # ln(m·2^r)/p, |t| < 1.04
    if sign < 0:
        t, q = t.neg_(), q.neg_()
    n = torch.round(t * 1.4426950408889634)  # eᵗ = 2ⁿ·eᶠ, |f| ≤ ln2/2 (n·_LN2_HI is exact)
    f = t.sub_(n * _LN2_HI).sub_(n * _LN2_LO)
    e = torch.ones_like(f)
    for j in range(_EXP_TERMS, 0, -1):
        e.mul_(f).mul_(1.0 / j).add_(1.0)
    total = q.add_(n.to(torch.int64))  # |total| ≤ 1077: two exact factors of 2
    half = torch.div(total, 2, rounding_mode="floor")
    y = e.mul_(_pow2(half)).mul_(_pow2(total - half))
    inf = float("inf")
    special = torch.where(x == 0, inf if sign < 0 else 0.0, 0.0 if sign < 0 else inf)
    special = torch.where((x == 0) | (x == inf), special, float("nan")).to(y.dtype)
    return torch.where(finite_pos, y, special).to(x.dtype)


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)


def _matvec(a: Tensor, v: Tensor) -> Tensor:
    """``a @ v`` for vectors ``v`` ``[..., n]`` as an elementwise product and a row sum.

    Not ``torch.matmul``: a batch of one goes to a matrix-vector kernel and a larger
    batch to another, which round differently (n ≥ 24 on a CPU), so a matrix's
    product would depend on how many others share its batch. A row sum is reduced
    in the same order whatever the batch.
    """
    return (a * v.unsqueeze(-2)).sum(-1)


def max_eigenvalue(a: Tensor, iters: int = 16) -> Tensor:
    """λ_max of PSD matrices by power iteration, ``[..., n, n] → [...]``.

    The estimate is a Rayleigh quotient, so it never exceeds λ_max; it is
    raised to the largest diagonal entry, which bounds λ_max from below too, so a
    start vector orthogonal to the top eigenvector cannot return 0. Each matrix's
    estimate is the same whatever else is in the batch (see :func:`_matvec`).
    """
    n = a.shape[-1]
    v = torch.linspace(1.0, 2.0, n, dtype=a.dtype, device=a.device)
    v = (v / v.norm()).expand(*a.shape[:-1])
    for _ in range(iters):
        w = _matvec(a, v)
        v = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    rayleigh = (v * _matvec(a, v)).sum(-1)
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


def eigh_inverse_root(a_damped: Tensor, p: int, eps: Tensor) -> Tensor:
    """``A_d^(-1/p)`` by eigendecomposition, eigenvalues floored at ``eps`` (``[...]``)."""
    return _eigh_root(a_damped, p, eps)[0]


def _eigh_root(a_damped: Tensor, p: int, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lam, q = torch.linalg.eigh(a_damped)
    lam = torch.maximum(lam, eps.unsqueeze(-1))
    return (q * root_power(lam, p).unsqueeze(-2)) @ q.transpose(-1, -2), lam, q


def coupled_newton_inverse_root(a_damped: Tensor, p: int, max_iters: int = 100, tol: float = 1e-6) -> Tensor:
    """``A_d^(-1/p)`` by the coupled Newton iteration (Guo & Higham 2006).

    z = (1+p)/(2‖A_d‖_F), M₀ = z·A_d, X₀ = z^(1/p)·I; then
    T = ((p+1)I − M)/p, X ← X·T, M ← T^p·M, until max|M − I| ≤ tol, or
    ``max_iters``, or the error grows 1.2× in one step (then the previous X
    is kept). Each matrix of the batch stops on its own.
    """
    eye = _eye_like(a_damped)
    fro = (a_damped * a_damped).sum(-1).sum(-1).sqrt()  # row sums: one order whatever the batch
    z = (1 + p) / (2 * fro).clamp_min(torch.finfo(a_damped.dtype).tiny)
    z = z[..., None, None]
    m = z * a_damped
    x = root_power(z, p, 1) * eye
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


ALIGN = 4  # matrices are padded to a multiple of this size for the batched kernels (see _one_attempt)


def _pad(a: Tensor, fill: Tensor) -> Tensor:
    """``[B, n, n] → [B, n', n']`` with n' the next multiple of :data:`ALIGN`:
    ``a`` in the top-left block, ``fill`` ``[B]`` on the new diagonal, zeros elsewhere."""
    n = a.shape[-1]
    m = -(-n // ALIGN) * ALIGN
    if m == n:
        return a
    out = a.new_zeros(a.shape[0], m, m)
    out[:, :n, :n] = a
    d = torch.arange(n, m, device=a.device)
    out[:, d, d] = fill.unsqueeze(-1)
    return out


def _one_attempt(
    a: Tensor, p: int, eps: float, relative: bool, method: RootMethod, max_iters: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stage for a batch ``[B, n, n]``; every matrix's results are the same whatever the batch.

    The matrices go through ``eigh`` and the matrix products padded to a multiple of
    :data:`ALIGN` (a block ``(λ_max+ε_eff)·I`` beside ``A_d``, the probes zero on it):
    in a batch, matrix i starts i·n'² elements in, and with n' a multiple of 4 that
    is a multiple of 64 bytes, where a matrix alone starts too. MKL's ``eigh`` and
    float64 products round differently at other alignments (measured: float32 n = 17,
    three offsets in four give other eigenvectors). The block is decoupled exactly
    (its rows and columns of ``A_d`` are zero), so the top-left block of the root is
    the root of ``A_d``.
    """
    n = a.shape[-1]
    lam_max = max_eigenvalue(a)
    eps_eff = eps * lam_max if relative else torch.full_like(lam_max, eps)
    a_damped = _pad(a + eps_eff[..., None, None] * _eye_like(a), lam_max + eps_eff)
    v = _probes(a)
    v = torch.cat([v, v.new_zeros(a_damped.shape[-1] - n, v.shape[-1])])
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
            root = torch.full_like(a_damped, float("nan"))
            a_v = torch.full_like(a_damped @ v, float("nan"))
    residual = probe_residual(root, a_v, v, p)
    if root.shape[-1] != n:
        root = root[..., :n, :n].contiguous()
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

    def attempt(x: Tensor, m: RootMethod, e: float, tol: float) -> tuple[Tensor, Tensor, Tensor]:
        return _one_attempt(x, p, e, relative_eps, m, newton_max_iters, tol)[:3]

    return _judged(a, chain, attempt, relative_eps=relative_eps, dtype=dtype, max_residual=max_residual,
                   newton_tol=newton_tol)  # fmt: skip


def eigenbasis(
    a: Tensor,
    *,
    eps: float = 1e-6,
    relative_eps: bool = True,
    dtype: torch.dtype | None = None,
    max_residual: float = 0.5,
    retries: int = 3,
) -> RootResult:
    """The eigenvectors Q (columns, eigenvalues ascending) of a batch of PSD matrices,
    judged and with fallbacks as :func:`inverse_root` judges roots: ``root`` holds Q.

    Q is that of ``A + ε_eff·I`` (the same eigenvectors; ε only matters to the
    fallback stages, which raise it). The chain is :func:`fallback_chain` for
    eigh (Newton gives no eigenvectors): eigh in ``dtype``, in fp64, then fp64 with
    ε×10, … A basis is rejected (``ok`` False) where it is not finite or its
    residual exceeds ``max_residual``: ``max(|A_d·Q·V − Q·Λ·V|/λ_max(A_d), |QᵀQ·V − V|)``
    on four fixed probe vectors V, so scale-free (eigh in fp32 gives ~1e-6).
    """
    chain = fallback_chain(RootMethod.EIGH, dtype or a.dtype, eps, retries)

    def attempt(x: Tensor, m: RootMethod, e: float, tol: float) -> tuple[Tensor, Tensor, Tensor]:
        return _basis_attempt(x, e, relative_eps)

    return _judged(a, chain, attempt, relative_eps=relative_eps, dtype=dtype, max_residual=max_residual,
                   newton_tol=None)  # fmt: skip


def power_step_basis(lq: Tensor, *, dtype: torch.dtype | None = None, max_residual: float = 0.5) -> RootResult:
    """The cheaper basis refresh (SOAP's): one QR power step instead of a full :func:`eigenbasis`.

    ``lq`` is ``[B, n, n]`` of ``L·Q_prev`` with Q_prev's columns reversed, largest eigenvalue
    first: the order that a power step keeps (simultaneous iteration drives the first column
    to the top eigenvector). The result is the Q of ``qr(lq)``, each column's sign chosen so
    that R's diagonal is ≥ 0, with its columns reversed back (ascending, as eigh gives them):
    the columns keep Q_prev's order and orientation, so the second moment V (and a first
    moment kept in the basis) stay matched to them, and Q converges to L's eigenvectors as
    refreshes repeat. Judged only as a basis: rejected (``ok`` False) where it is not finite
    or ``|QᵀQ·V − V|`` on the probe vectors exceeds ``max_residual``, and the previous basis is
    then kept. ``lambda_max`` is the largest ``|R_ii|`` (≈ λ_max of L), ``eps`` 0; the one
    stage is ``"qr/fp32"`` (or ``"qr/fp64"``). Each matrix's Q does not depend on the batch (LAPACK factors
    them one by one)."""
    x = lq.to(dtype or lq.dtype)
    q, r = torch.linalg.qr(x)
    diag = r.diagonal(dim1=-2, dim2=-1)
    q = (q * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)[..., None, :]).flip(-1)
    v = _probes(q)
    residual = (q.mT @ (q @ v) - v).abs().amax((-2, -1))
    ok = torch.isfinite(q).all(-1).all(-1) & (residual <= max_residual)
    residual = torch.where(torch.isfinite(residual), residual, torch.full_like(residual, math.inf))
    return RootResult(q.to(lq.dtype), residual, torch.zeros_like(residual), diag.abs().amax(-1), ok,
                      torch.where(ok, 0, -1), (f"qr/{'fp64' if x.dtype == torch.float64 else 'fp32'}",))  # fmt: skip


def _basis_attempt(a: Tensor, eps: float, relative: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One eigh stage of :func:`eigenbasis` for ``[B, n, n]``: (Q, residual, ε_eff).

    Padded as in :func:`_one_attempt` (batch-independent results), but the padding
    block is ``2·(tr A + ε_eff)·I``, above every eigenvalue of ``A_d``, so that its
    eigenvectors are the last columns and never mix with A's (a tie with
    ``λ_max + ε_eff``, the roots' padding, would mix them)."""
    n = a.shape[-1]
    lam_max = max_eigenvalue(a)
    eps_eff = eps * lam_max if relative else torch.full_like(lam_max, eps)
    top = a.diagonal(dim1=-2, dim2=-1).sum(-1) + eps_eff
    a_damped = _pad(a + eps_eff[..., None, None] * _eye_like(a), 2 * top + 1)
    v = _probes(a)  # [n, 4]
    try:
        lam, q = torch.linalg.eigh(a_damped)
    except torch.linalg.LinAlgError:  # did not converge: report every matrix as failed
        lam, q = torch.full_like(a_damped[..., 0], float("nan")), torch.full_like(a_damped, float("nan"))
    lam, q = lam[..., :n], q[..., :n]  # A_d's eigenpairs: the padding's are the last columns
    qv = q @ v
    scale = (lam_max + eps_eff).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    eig_err = ((a_damped @ qv) - q @ (lam.unsqueeze(-1) * v)).abs() / scale
    orth_err = (q.transpose(-1, -2) @ qv - v).abs()
    residual = torch.maximum(eig_err.amax((-2, -1)), orth_err.amax((-2, -1)))
    return q[..., :n, :].contiguous(), residual, eps_eff


def _judged(
    a: Tensor,
    chain: list[tuple[str, RootMethod, torch.dtype, float]],
    attempt: Callable[[Tensor, RootMethod, float, float], tuple[Tensor, Tensor, Tensor]],
    *,
    relative_eps: bool,
    dtype: torch.dtype | None,
    max_residual: float,
    newton_tol: float | None,
) -> RootResult:
    """Run ``attempt`` down ``chain`` for the matrices not yet accepted (finite, residual ≤ ``max_residual``)."""
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
        r, res, e_eff = attempt(flat[idx].to(d), m, e, tol)
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
