r"""Shampoo: a drop-in replacement for ``torch.optim.AdamW``.

One step, for every parameter and every block of it (see ``blocks.py``)::

    G ← ∇W (+ λW with L2 weight decay)
    L_i ← β₂·L_i + w·G₍ᵢ₎G₍ᵢ₎ᵀ              per axis, per block, fp32; w = 1 if β₂ = 1 else 1 − β₂
    every N steps: roots L_i^(-1/p)          inline or in the background (the scheduler)
    M ← β₁M + (1−β₁)G;  Ĝ = M/(1−β₁ᵗ)        Adam-style first moment (skipped when β₁ = 0)
    D ← graft(Ĝ)                             the first-order update (AdaGrad, Adam, …)
    P ← Ĝ ×ᵢ L_i^(-1/p);  P ← P·‖D‖/‖P‖      per block; P = D for a block without roots
    B ← μB + P;  P ← B (or P + μB, Nesterov)  optional heavy-ball momentum
    W ← W(1 − lr·λ) − lr·P                   decoupled weight decay (default)

β₁ filters the gradient *before* it is preconditioned, so that with no roots
Shampoo with Adam, AdaGrad or SGD grafting is exactly Adam(W), Adagrad or SGD.

``preconditioner="eigenvalue_corrected"`` (SOAP-style, ``eigen.py``) replaces the two
P lines: every N steps the eigenvectors Q_i of L_i (same schedulers), and every step
G̃ = G ×ᵢ Q_iᵀ;  V ← β₂V + (1−β₂)G̃²;  P = (Ĝ ×ᵢ Q_iᵀ)/(√V̂ + ε) ×ᵢ Q_i (Adam where
a block has no basis yet), with no grafting unless asked for.

The class gathers tensors; the formulas live in pure functions: the per-block
math in ``kronecker.py`` and ``grafting.py``, run by one engine (``buckets.py``)
on stacks of equal blocks, and the elementwise math in ``functional.py``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from .background import InlineRoots, RootJob, RootOptions, RootOutcome, RootScheduler
from .blocks import BlockPlan, make_plan, normalize_axes, rows_plan
from .buckets import Buckets, Corrected, Entry, Spec
from .distributed import (
    Grid,
    Piece,
    Sharding,
    assign_owners,
    from_owners,
    grid,
    param_cost,
    placement_error,
    row_costs,
    split_rows,
    to_owners,
)
from .functional import compiled, first_moment_, graft_stage_, heavy_ball_, weight_update_
from .grafting import GraftingType, bias_correction, graft_directions
from .groups import PlanTable, plan_table
from .kronecker import pack_root_, packed_statistic
from .matrix_roots import RootMethod
from .state import (
    RootInfo,
    StateCodec,
    basis_key,
    diag_key,
    diagnostics,
    info_key,
    memory,
    method_key,
    packed_key,
    root_key,
    stat_key,
)  # fmt: skip

__all__ = ["NonFiniteGrad", "Preconditioner", "Shampoo"]

ParamGrad = tuple[int, dict[str, Any], Tensor, Tensor]  # (index, group, parameter, gradient; see _params_with_grad)
_SCHEDULER_METHODS = ("run", "state_dict", "load_state_dict", "close")
# what a copy or a pickle carries besides torch's defaults, state and param_groups, and
# what an optimizer pickled by a version that lacked an attribute gets for it
_COPIED = ("nonfinite_grad", "global_step", "skipped_steps", "batched", "compile_elementwise", "scheduler", "_sharding",
           "fsdp")  # fmt: skip
FSDP_MODES = ("lossless", "local")


def _height(plan: BlockPlan) -> int:
    """Rows of a plan's merged axis 0 (0 for a scalar or an empty parameter)."""
    return plan.merged[0] if plan.blocks and plan.merged else 0


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's (FSDP2) local shard; other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


class Preconditioner(str, Enum):
    """What the statistics precondition with."""

    ROOT = "root"  # inverse roots L_i^(-1/p), grafted (Shampoo)
    EIGENVALUE_CORRECTED = "eigenvalue_corrected"  # Adam in the eigenbasis of the L_i (SOAP, EKFAC)


class NonFiniteGrad(str, Enum):
    """What a step does when any gradient holds a NaN or an Inf."""

    SKIP = "skip"  # skip the step (also if max|g| ≥ √(max_float/numel)), touch no state, count it
    RAISE = "raise"  # raise FloatingPointError naming the parameter; nothing is changed


def _enum_value(cls: type[Enum], name: str, value: Any) -> str:
    try:
        return str(cls(value).value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _grafting(group: dict[str, Any]) -> GraftingType:
    return GraftingType(group["grafting"])


def _corrected(group: dict[str, Any]) -> bool:
    return bool(group["preconditioner"] == Preconditioner.EIGENVALUE_CORRECTED.value)


def _rotated_first_moment(group: dict[str, Any]) -> bool:
    return _corrected(group) and group["first_moment_basis"] == "rotated" and group["betas"][0] > 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Shampoo(torch.optim.Optimizer):
    """Shampoo with grafting, blocking and delayed (optionally background) roots.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: learning rate (the grafted method's; keep AdamW's): a float, or a 0-dim or
            1-element Tensor, as in torch.optim (read as ``float(lr)`` at each step, so
            LR schedulers may write into it and the step is bit-identical to that float's).
        betas: (β₁, β₂). β₁ is the first-moment EMA of the gradient (0 disables);
            β₂ is the EMA of the Kronecker statistics (1 sums them, AdaGrad style)
            and, unless ``grafting_beta2`` is set, of the grafting accumulator.
        eps: the grafting method's ε (Adam's eps).
        weight_decay: λ; decoupled (AdamW) unless ``decoupled_weight_decay=False`` (L2).
            As AdamW's, it decays weights whose gradient is zero (not those with none).
        momentum, nesterov: heavy-ball momentum on the grafted direction, as ``torch.optim.SGD``.
        preconditioner: ``"root"`` (default): Shampoo's inverse roots, grafted.
            ``"eigenvalue_corrected"``: SOAP-style (George et al. 2018, Vyas et al. 2024,
            ``eigen.py``): every ``precondition_frequency`` steps the eigenvectors Q_i of each
            statistic (eigh with the roots' fallback chain and rejection: a failed basis keeps
            the previous one), computed by the same ``scheduler``; every step Adam runs in
            that basis, V ← β₂V + (1−β₂)G̃² on G̃ = G ×ᵢ Q_iᵀ (β₂ = ``betas[1]``, also the
            statistics'), P = (Ĝ ×ᵢ Q_iᵀ)/(√V̂ + ε) ×ᵢ Q_i. The first moment stays in the
            original basis (rotated each step with the current Q; chosen on a benchmark,
            see the README). When a basis is replaced V is kept as it is, as SOAP keeps it
            (bases refreshed every N ≪ 1/(1−β₂) steps barely move; V re-adapts within
            ~1/(1−β₂) steps). Blocks without a basis on every axis (before
            ``start_preconditioning_step``, unpreconditioned tensors) take Adam's update in
            the original basis, and an axis without a statistic (one-sided) is not rotated,
            so Adam runs along it. ``root_storage_dtype`` sets the basis's storage, and
            ``exponent_override`` p makes the denominator V̂^(1/p) + ε (default p = 2).
            It costs the roots' memory for the bases plus V (``exp_avg_sq``, one parameter-sized
            buffer); ``compile_elementwise`` does not apply to it (eager).
        basis_refresh: with the eigenvalue-corrected preconditioner, how a basis is refreshed
            once a block has one: ``"eigh"`` (default; a full eigendecomposition, with the
            fallback chain) or ``"qr"``: one QR power step from the installed basis, SOAP's
            cheaper refresh (one matmul L·Q per statistic on the training thread at the refresh
            step, then a QR instead of eigh in the scheduler's job; see
            :func:`~scalable_shampoo.matrix_roots.power_step_basis`). The first basis always
            comes from eigh.
        grafting: a :class:`GraftingType` or its name; default (``None``): ``"adam"`` with
            the root preconditioner, ``"none"`` with the eigenvalue-corrected one (its V
            sets the scale; another type rescales each block's P to that method's norm).
        grafting_beta2: β₂ of the RMSprop/Adam grafting accumulator (default: ``betas[1]``).
        block_size: blocks are at most this long along every preconditioned axis.
        max_preconditioner_dim: an axis longer than this keeps no statistic (one-sided).
        merge_dims_bound: the dims after the leading one are merged from the right while
            their product stays ≤ this (default: ``block_size``): fan-in grouping, so a
            conv kernel ``[out, in, kh, kw]`` is preconditioned as ``[out, in·kh·kw]``.
        precondition_axes: the dims of each parameter that may keep a statistic, e.g.
            ``(1,)`` or ``(-1,)`` for an embedding table's d side (negative dims count
            from the end); the others get the grafted diagonal. ``None`` (default): all.
            Usually set per param group (see :func:`~scalable_shampoo.param_groups_for`).
        precondition_1d: precondition vectors with a full d×d statistic.
        exponent_override: use ``L^(-1/p)`` with this p for every factor (default 2k).
        precondition_frequency: recompute roots every this many steps.
        start_preconditioning_step: the first step with roots; the update is the
            grafting update before it.
        matrix_eps: ε added to the statistics before the root; relative to λ_max
            unless ``matrix_eps_relative=False``.
        root_method: ``"auto"`` (eigh on CPU, coupled Newton on GPU), ``"eigh"`` or ``"newton"``.
        root_dtype: ``torch.float32`` or ``torch.float64``, the precision of root computation.
        root_storage_dtype: the dtype installed roots are kept in (default: the statistics'
            dtype, fp32). ``torch.bfloat16`` halves the roots' memory; each root is cast
            back up for the contraction, so only its storage is rounded (8 bits of
            mantissa). The statistics stay fp32 whatever this is.
        packed_storage: keep each statistic and its inverse root in one n×n matrix (the
            statistic's lower triangle with its diagonal, the root's strict upper triangle)
            plus the root's diagonal: n² + n numbers per factor instead of 2n², so statistics
            and roots take the memory that the statistics alone take otherwise, and the engine
            works in chunks of 2¹⁸ elements (scratch of about 4 such chunks). Costs step time:
            each step unpacks every root and updates the lower triangle alone (see the
            README's memory table). Fp32 roots only (no ``root_storage_dtype``); the root
            preconditioner only. State keys ``packed.*`` and ``root_diag.*`` instead of
            ``stat.*`` and ``root.*``. A checkpoint of either layout loads into either: unlike
            other settings, this one is the optimizer's, and the state is converted to it.
        max_root_residual: a root whose residual (``max|X^p·A·V − V|`` on probe vectors V)
            is above this goes down the fallback chain (eigh, fp64, then ε×10 up to
            ``root_retries`` times) and is then rejected (the previous root stays). In fp32 at
            the ε cap (condition ~1e6) a sound root's residual is ~κ·u ≈ 0.05–0.3, so
            0.5 separates rounding from failure without sending roots to fp64 for nothing.
        nonfinite_grad: ``"skip"`` (default) or ``"raise"``, see :class:`NonFiniteGrad`.
        scheduler: where roots are computed; default inline (:class:`InlineRoots`).
        process_group: under data parallelism, the ranks that share the optimizer (ZeRO-1,
            ``distributed.py``): each rank owns some parameters, keeps their state and
            computes their updates, and one ``all_gather`` per step shares the updates.
            ``"default"``: the default group when torch.distributed is initialised with
            more than one rank; ``None``: every rank keeps and computes everything. The
            gradients must be identical on every rank of the group (averaged, as by DDP).
        communication_dtype: the dtype updates travel in under ``process_group``: ``None``
            (each update's own, fp32 or fp64: bit-identical to one process) or
            ``torch.bfloat16`` (half the bytes; every rank applies the same rounded update).
            Gradients (``fsdp="lossless"``) always travel in fp32 (fp64 for fp64 parameters).
        fsdp: how DTensor parameters (FSDP2 ``fully_shard``; HSDP with a 2-D mesh) are stepped.
            Their placements must be FSDP2's (``Shard(0)``, and ``Replicate()`` on a second
            mesh dim for HSDP); anything else (tensor parallel, ``Partial``) is a ValueError.
            A mesh of more than one rank needs ``process_group`` to be the mesh's ranks.

            - ``"lossless"`` (default): each parameter has an owner rank (balanced as under
              ZeRO-1) that keeps its whole state; an ``all_to_all`` brings it the gradient rows
              it lacks, it computes the update as one process would, and a second
              ``all_to_all`` sends each rank its rows of it. **Bit-identical to one process**
              (in fp32 communication); per-rank state ≈ 1/W; about 2·(W−1)/W² of the
              parameters' bytes received per rank and step.
            - ``"local"``: each rank preconditions blocks cut from its own rows (its local
              shard) as if they were a parameter of their own, and keeps state only for them;
              no communication but a per-parameter flag all-reduce that makes every rank skip
              a non-finite step together (under HSDP a replica group splits the work ZeRO-1
              style, one ``all_gather`` in the replicate dim). Not unsharded Shampoo: a
              block never spans two shards, so the statistics of a rows-block of a shard are
              kept instead of the parameter's (rows of different shards are never correlated);
              block boundaries, the grafting norms (per block) and ``max_preconditioner_dim``
              apply to the shard's shape; a shard shorter than a block gets a smaller block.
              The result depends on the world size. Checkpoints: ``distributed.save_checkpoint``
              writes each shard's state under its own keys and ``load_checkpoint`` reads it
              back on the same mesh shape in ``"local"`` mode only (else a ``ValueError``
              naming the saved and the present mesh or mode, before anything loads);
              ``state_dict()`` on more than one rank raises ``NotImplementedError``.
        batched: stack the equal blocks of all parameters (batched matmuls, ``buckets.py``);
            ``False``: a stack per block, the reference it is tested against.
        compile_elementwise: run the first moment, the grafting accumulators and the
            weight update through ``torch.compile`` (``functional.py``) instead of eager
            ``torch._foreach_*`` ops. Off by default: on a CPU it was slower (see the
            README). Normalized grafting and heavy-ball momentum stay eager.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        decoupled_weight_decay: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        preconditioner: Preconditioner | str = Preconditioner.ROOT,
        first_moment_basis: str = "original",
        basis_refresh: str = "eigh",
        grafting: GraftingType | str | None = None,
        grafting_beta2: float | None = None,
        block_size: int = 1024,
        max_preconditioner_dim: int = 4096,
        merge_dims_bound: int | None = None,
        precondition_axes: Sequence[int] | None = None,
        precondition_1d: bool = False,
        exponent_override: int | None = None,
        precondition_frequency: int = 20,
        start_preconditioning_step: int = 10,
        matrix_eps: float = 1e-6,
        matrix_eps_relative: bool = True,
        root_method: RootMethod | str = RootMethod.AUTO,
        root_dtype: torch.dtype = torch.float32,
        root_storage_dtype: torch.dtype | None = None,
        packed_storage: bool = False,
        max_root_residual: float = 0.5,
        root_retries: int = 3,
        nonfinite_grad: NonFiniteGrad | str = NonFiniteGrad.SKIP,
        scheduler: RootScheduler | None = None,
        process_group: Any = "default",
        communication_dtype: torch.dtype | None = None,
        fsdp: str = "lossless",
        batched: bool = True,
        compile_elementwise: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            momentum=momentum, nesterov=nesterov, preconditioner=preconditioner,
            first_moment_basis=first_moment_basis, basis_refresh=basis_refresh, grafting=grafting,
            grafting_beta2=grafting_beta2,
            block_size=block_size, max_preconditioner_dim=max_preconditioner_dim, merge_dims_bound=merge_dims_bound,
            precondition_axes=precondition_axes,
            precondition_1d=precondition_1d, exponent_override=exponent_override,
            precondition_frequency=precondition_frequency, start_preconditioning_step=start_preconditioning_step,
            matrix_eps=matrix_eps, matrix_eps_relative=matrix_eps_relative, root_method=root_method,
            root_dtype=root_dtype, root_storage_dtype=root_storage_dtype, packed_storage=packed_storage,
            max_root_residual=max_root_residual,
            root_retries=root_retries,
        )  # fmt: skip
        # every argument is checked before ``params`` is read, so the error names the bad argument
        self._validate({**defaults, "params": []})
        _require(isinstance(batched, bool), "batched", batched, "True or False")
        _require(isinstance(compile_elementwise, bool), "compile_elementwise", compile_elementwise, "True or False")
        cd = communication_dtype
        _require(cd in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16), "communication_dtype", cd,
                 "None or a floating-point torch.dtype")  # fmt: skip
        is_scheduler = scheduler is None or all(callable(getattr(scheduler, m, None)) for m in _SCHEDULER_METHODS)
        _require(is_scheduler, "scheduler", scheduler, f"None or a root scheduler ({', '.join(_SCHEDULER_METHODS)})")
        _require(fsdp in FSDP_MODES, "fsdp", fsdp, " or ".join(map(repr, FSDP_MODES)))
        self.fsdp: str = fsdp
        self.nonfinite_grad = NonFiniteGrad(_enum_value(NonFiniteGrad, "nonfinite_grad", nonfinite_grad))
        self.scheduler: RootScheduler = scheduler if scheduler is not None else InlineRoots()
        if process_group == "default":
            process_group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        self._sharding: Sharding | None = None
        if process_group is not None and dist.get_world_size(process_group) > 1:
            self._sharding = Sharding(process_group, communication_dtype)
        self._owner_cache: tuple[Any, list[list[Piece]]] = ((), [])
        self._split: dict[Tensor, tuple[int, int]] = {}  # this rank's rows of each parameter split among ranks
        self.global_step = 0  # steps taken (skipped steps not counted)
        self.skipped_steps = 0
        self.batched = batched
        self.compile_elementwise = compile_elementwise
        self._buckets = Buckets()  # the engine: stacked blocks; state entries are views of them
        self._placement: dict[Tensor, tuple[torch.device, torch.dtype]] = {}  # where each parameter's state lives
        self._grids: dict[Tensor, Grid] = {}  # where a DTensor parameter's rows live
        self._replicas: dict[Any, Sharding] = {}  # fsdp="local" under HSDP: this rank's replicate group
        super().__init__(params, defaults)
        StateCodec.attach(self)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._refuse_duplicates(param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_buckets"):
            self._buckets.invalidate()
        group = self.param_groups[-1]
        try:
            self._validate(group)
            first = sum(len(g["params"]) for g in self.param_groups[:-1])  # the index of its first parameter
            self._check_dtensors(list(enumerate(group["params"], first)))
        except ValueError:
            self.param_groups.pop()
            raise

    def _refuse_duplicates(self, param_group: dict[str, Any]) -> None:
        """A tensor may be in one param group, once: it has one state and takes one step."""
        params = param_group.get("params")
        new = [params] if isinstance(params, Tensor) else list(params) if params is not None else []
        seen = {id(p): (gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}
        group = len(self.param_groups)
        for i, p in enumerate(new):
            if not isinstance(p, Tensor):
                continue  # torch.optim's own check names the type
            if id(p) in seen:
                gi, j = seen[id(p)]
                where = f"param group {gi}, position {j}" if gi < group else f"this group, position {j}"
                raise ValueError(
                    f"params: the tensor at position {i} of param group {group} (shape {tuple(p.shape)}) is "
                    f"already in {where}; a tensor may be in only one param group, once"
                )
            seen[id(p)] = (group, i)
        if params is not None and not isinstance(params, (Tensor, list, tuple, set)):
            param_group["params"] = new  # a generator was consumed here

    def _check_placement(self, params: list[ParamGrad]) -> None:
        """Refuse a parameter whose device or dtype changed after its state was created
        (``model.to(...)``, ``model.double()`` after the optimizer was built)."""
        for i, _, p, _ in params:
            now = (p.device, p.dtype)
            was = self._placement.get(p)
            if was is None or not self.state.get(p):  # no state yet: it will be created where p is now
                self._placement[p] = now
            elif was != now:
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) is now {now[1]} on {now[0]}, but its optimizer "
                    f"state was created for {was[1]} on {was[0]} (was the model moved or cast after the "
                    "optimizer was built?); build the optimizer after model.to(...). No state was changed"
                )

    def _check_dtensors(self, params: list[tuple[int, Tensor]]) -> None:
        """Refuse a DTensor parameter (``params``: (index, parameter)) whose placements are not
        FSDP2's or HSDP's (tensor parallel, ``Partial``), or whose mesh is not the process group;
        records where its rows live. Run as a param group is added, before it has any state."""
        for i, p in params:
            if not isinstance(p, DTensor) or p in self._grids:
                continue
            why = placement_error(p)
            if why is not None:
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) is a DTensor with {why}: Shampoo steps only "
                    "FSDP2/HSDP parameters (placements Shard(0) on one mesh dim, Replicate() on at most one "
                    "other), not tensor-parallel (Shard(d) for d ≠ 0, strided shards) or Partial ones. "
                    "No state was changed"
                )
            if p.device_mesh.size() > 1 and self._sharding is None:
                raise ValueError(
                    f"process_group=None, but parameter {i} is a DTensor sharded over {p.device_mesh.size()} "
                    "ranks: its rows must be exchanged (fsdp='lossless') or its step agreed on (fsdp='local') "
                    "in the process group of its mesh (the default)"
                )
            if self._sharding is not None:
                try:
                    where = grid(p, self._sharding.group)
                except ValueError as e:
                    raise ValueError(f"parameter {i}: {e}") from None
                a, b = where.rows[where.where(self._sharding.rank)[1]]
                if _local(p).shape[0] != b - a:
                    raise ValueError(f"parameter {i}: its local shard is not rows {a}…{b - 1} of it (torch.chunk's)")
                self._grids[p] = where

    @staticmethod
    def _validate(g: dict[str, Any]) -> None:
        for p in g["params"]:
            if p.is_complex():
                raise ValueError(f"complex parameters are not supported, got dtype {p.dtype}")
        lr = g["lr"]
        if isinstance(lr, Tensor):  # as torch.optim: a 1-element Tensor lr (read as float(lr) at each step)
            if lr.numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
            _require(lr.is_floating_point() and float(lr) >= 0, "lr", lr, "a floating-point Tensor ≥ 0")
        else:
            _require(_is_number(lr) and lr >= 0, "lr", lr, "a number ≥ 0 or a 1-element Tensor")
        betas = g["betas"]
        _require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas, "a pair (β₁, β₂)")
        _require(_is_number(betas[0]) and 0 <= betas[0] < 1, "betas[0]", betas[0], "in [0, 1)")
        _require(_is_number(betas[1]) and 0 < betas[1] <= 1, "betas[1]", betas[1], "in (0, 1]")
        gb2 = g["grafting_beta2"]
        _require(gb2 is None or (_is_number(gb2) and 0 < gb2 <= 1), "grafting_beta2", gb2, "None or in (0, 1]")
        _require(_is_number(g["eps"]) and g["eps"] > 0, "eps", g["eps"], "> 0")
        wd = g["weight_decay"]
        _require(_is_number(wd) and wd >= 0, "weight_decay", wd, "≥ 0")
        mom = g["momentum"]
        _require(_is_number(mom) and 0 <= mom < 1, "momentum", mom, "in [0, 1)")
        for name in ("decoupled_weight_decay", "nesterov", "precondition_1d", "matrix_eps_relative"):
            _require(isinstance(g[name], bool), name, g[name], "True or False")
        _require(not g["nesterov"] or mom > 0, "nesterov", g["nesterov"], "False when momentum is 0")
        g["preconditioner"] = _enum_value(Preconditioner, "preconditioner", g.get("preconditioner", "root"))
        fmb = g.get("first_moment_basis", "original")
        _require(fmb in ("original", "rotated"), "first_moment_basis", fmb, "'original' or 'rotated'")
        br = g.get("basis_refresh", "eigh")
        _require(br in ("eigh", "qr"), "basis_refresh", br, "'eigh' or 'qr'")
        if g["grafting"] is None:  # the preconditioner's default
            g["grafting"] = GraftingType.NONE.value if _corrected(g) else GraftingType.ADAM.value
        g["grafting"] = _enum_value(GraftingType, "grafting", g["grafting"])
        g["root_method"] = _enum_value(RootMethod, "root_method", g["root_method"])
        for name in ("block_size", "max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step"):
            v = g[name]
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an integer ≥ 1")
        mdb = g["merge_dims_bound"]
        _require(mdb is None or (isinstance(mdb, int) and mdb >= 1), "merge_dims_bound", mdb, "None or an integer ≥ 1")
        pa = g.get("precondition_axes")
        ints = isinstance(pa, (tuple, list)) and all(isinstance(a, int) and not isinstance(a, bool) for a in pa)
        _require(pa is None or ints, "precondition_axes", pa, "None or a sequence of ints (dims of the parameter)")
        if pa is not None:
            g["precondition_axes"] = tuple(pa)
            _require(len(set(pa)) == len(pa), "precondition_axes", pa, "dims without repeats")
            for i, p in enumerate(g["params"]):
                try:
                    dims = normalize_axes(tuple(pa), p.dim())
                except IndexError:
                    dims = None
                if dims is None or len(dims) != len(pa):
                    raise ValueError(
                        f"precondition_axes={tuple(pa)} does not fit parameter {i} of its group, "
                        f"of shape {tuple(p.shape)}: each dim must be in [-{p.dim()}, {p.dim()}) "
                        "and name a different dim"
                    )
        eo = g["exponent_override"]
        _require(eo is None or (isinstance(eo, int) and eo >= 1), "exponent_override", eo, "None or an integer ≥ 1")
        me = g["matrix_eps"]
        _require(_is_number(me) and me > 0, "matrix_eps", me, "> 0")
        rd = g["root_dtype"]
        _require(rd in (torch.float32, torch.float64), "root_dtype", rd, "torch.float32 or torch.float64")
        rs = g["root_storage_dtype"]
        floating = isinstance(rs, torch.dtype) and rs.is_floating_point and not rs.is_complex
        _require(rs is None or floating, "root_storage_dtype", rs, "None or a floating-point torch.dtype")
        ps = g.setdefault("packed_storage", False)
        _require(isinstance(ps, bool), "packed_storage", ps, "True or False")
        if ps and (rs is not None or g["preconditioner"] != "root"):
            clash = f"root_storage_dtype={rs}" if rs is not None else f"preconditioner={g['preconditioner']!r}"
            raise ValueError(
                f"packed_storage=True does not go with {clash}: packed storage keeps fp32 inverse roots "
                "of the root preconditioner (set root_storage_dtype=None and preconditioner='root')"
            )
        mr = g["max_root_residual"]
        _require(_is_number(mr) and mr > 0, "max_root_residual", mr, "> 0")
        rr = g["root_retries"]
        _require(isinstance(rr, int) and rr >= 0, "root_retries", rr, "an integer ≥ 0")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def plan(p: Tensor, group: dict[str, Any]) -> BlockPlan:
        """How ``p`` is blocked under ``group``'s settings (cached per shape)."""
        bound = group["merge_dims_bound"] or group["block_size"]
        return make_plan(tuple(p.shape), group["block_size"], group["max_preconditioner_dim"], bound,
                         group["precondition_1d"], normalize_axes(group.get("precondition_axes"), p.dim()))  # fmt: skip

    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    @staticmethod
    def _root_options(group: dict[str, Any]) -> RootOptions:
        return RootOptions(
            RootMethod(group["root_method"]), group["matrix_eps"], group["matrix_eps_relative"], group["root_dtype"],
            group["max_root_residual"], group["root_retries"], newton_max_iters=100,
            newton_tol=1e-12 if group["root_dtype"] == torch.float64 else 1e-6, eigenbasis=_corrected(group),
        )  # fmt: skip

    @staticmethod
    def _qr_refresh(group: dict[str, Any], state: dict[str, Any], block: int, axis: int) -> bool:
        """Whether this basis is refreshed by one QR power step from the installed one."""
        return _corrected(group) and group["basis_refresh"] == "qr" and basis_key(block, axis) in state

    @staticmethod
    def _eigen_p(group: dict[str, Any]) -> int:
        """p of V^(1/p) in the eigenvalue-corrected step (2: Adam's √), or 0 for the root preconditioner."""
        return (group["exponent_override"] or 2) if _corrected(group) else 0

    def state_dict(self) -> dict[str, Any]:
        if self._sharding is not None and any(self._is_local(p) for g in self.param_groups for p in g["params"]):
            raise NotImplementedError(
                "state_dict() of fsdp='local' state on more than one rank is not supported yet: each rank's "
                "state is of its own shards and would not merge into one checkpoint; use "
                "scalable_shampoo.distributed.save_checkpoint (same mesh) or fsdp='lossless'"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._placement.clear()  # the loaded state was cast to where the parameters are now
        self._buckets.invalidate()  # the loaded tensors are re-stacked at the next step

    # ------------------------------------------------------------------ copies and pickles
    @classmethod
    def group_defaults(cls) -> dict[str, Any]:
        """Every param-group setting and its constructor default.

        A param group loaded from a checkpoint (or an unpickled optimizer) that lacks
        a setting, because it was written before the setting existed, gets this
        default, as torch.optim's optimizers do in ``__setstate__``. A new setting's
        default therefore reproduces the behaviour from before it existed.
        """
        skip = {"self", "params", "nonfinite_grad", "scheduler", "process_group", "communication_dtype", "batched",
                "compile_elementwise", "fsdp"}  # fmt: skip
        sig = inspect.signature(cls.__init__).parameters
        defaults = {name: prm.default for name, prm in sig.items() if name not in skip}
        return {k: v.value if isinstance(v, Enum) else v for k, v in defaults.items()}  # as groups hold them

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, param_groups) plus the step counters, the policies
        and the scheduler, which copies its pending results and, in the copy, starts
        its own workers (see ``background.py``). Stacked buckets are rebuilt by the copy."""
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in _COPIED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with only state and param_groups; copy.deepcopy,
        # pickle and torch.load(opt) with everything __getstate__ gave
        had_differentiable = "differentiable" in state.get("defaults", self.__dict__.get("defaults", {}))
        super().__setstate__(state)
        if not had_differentiable:  # torch adds it; Shampoo has no such setting, and a copy equals its original
            self.defaults.pop("differentiable", None)
        defaults = self.group_defaults()
        for group in [self.defaults, *self.param_groups]:
            for name, value in defaults.items():
                group.setdefault(name, value)
        if "_buckets" not in self.__dict__:  # a copy or an unpickled optimizer, not a load_state_dict
            fallback = dict(nonfinite_grad=NonFiniteGrad.SKIP, skipped_steps=0, batched=True, compile_elementwise=False,
                            global_step=max((int(s["step"]) for s in self.state.values() if "step" in s), default=0),
                            _sharding=None, fsdp="lossless")  # fmt: skip
            for name in _COPIED:
                if name not in self.__dict__:
                    setattr(self, name, InlineRoots() if name == "scheduler" else fallback[name])
            self._buckets = Buckets()
            self._owner_cache = ((), [])
            self._split = {}
            self._placement = {}
            self._grids, self._replicas = {}, {}
            StateCodec.attach(self)  # torch's __setstate__ starts with no hooks: the library's come back

    def _params_with_grad(self) -> list[ParamGrad]:
        """(index, group, parameter, gradient) of every parameter with a gradient: the whole
        gradient, or a DTensor's local shard of it (FSDP2: nothing is gathered here)."""
        out = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.numel() > 0:
                    if p.grad.is_sparse:
                        raise ValueError(f"sparse gradients are not supported (parameter {index})")
                    out.append((index, group, p, _local(p.grad)))
                index += 1
        return out

    def _grads_finite(self, params: list[ParamGrad]) -> bool:
        """True unless a gradient is NaN/Inf, or so large that its statistics could overflow.

        G₍ᵢ₎G₍ᵢ₎ᵀ sums at most numel(G) products, so max|G| < √(max_float/numel) keeps
        every statistic and accumulator finite (1.8e16 for a million fp32 entries).
        """

        def limit(p: Tensor, grad: Tensor) -> float:  # of the whole parameter (a shard's is larger)
            return float((torch.finfo(self._state_dtype(p)).max / p.numel()) ** 0.5)

        def peak(grad: Tensor) -> Tensor:  # max|G| without an |G| copy (NaN stays NaN)
            lo, hi = torch.aminmax(grad)
            return torch.maximum(hi, lo.neg())

        if self._sharding is not None and any(isinstance(p, DTensor) for _, _, p, _ in params):
            # each rank sees its shards only: every rank takes (or skips) the step together
            flags = torch.stack([peak(g) < limit(p, g) if g.numel() else torch.tensor(True, device=g.device)
                                 for _, _, p, g in params])  # fmt: skip
            ok = self._sharding.all_true(self.global_step + 1, flags)
            if bool(ok.all()):
                return True
            if self.nonfinite_grad is NonFiniteGrad.RAISE:
                first = params[int((~ok).nonzero()[0])][0]
                raise FloatingPointError(f"non-finite gradient in parameter {first}; no state was changed")
            return False
        per_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
        for _, _, p, grad in params:
            per_device.setdefault(grad.device, []).append((p, grad))
        if all(  # max|G|/limit < 1 for all (False for NaN and Inf too): one host sync per device
            bool((torch.stack(torch._foreach_div([peak(g) for _, g in pg], [limit(p, g) for p, g in pg])) < 1).all())
            for pg in per_device.values()
        ):
            return True
        if self.nonfinite_grad is NonFiniteGrad.RAISE:
            first = next(i for i, _, p, grad in params if not bool(peak(grad) < limit(p, grad)))
            raise FloatingPointError(f"non-finite gradient in parameter {first}; no state was changed")
        return False

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_grad()
        self._check_placement(params)
        if not self._grads_finite(params):
            self.skipped_steps += 1  # nothing touched: statistics, roots, moments, weights
            return loss
        self.global_step += 1

        every = params
        # G ← ∇W (+ λW with L2 weight decay), of what this rank updates: everything on one process;
        # its own parameters (ZeRO-1, FSDP2 "lossless": their gradient rows come over all_to_all);
        # the blocks of its local shards (FSDP2 "local")
        params, grads = self._my_work(every)
        steps = self._count_steps(params)
        self._buckets.bind(self.state, self._entries(params, grads), self.batched)
        # L_i ← β₂·L_i + w·G₍ᵢ₎G₍ᵢ₎ᵀ, per block and axis
        self._buckets.update_statistics(grads)
        # every N steps: roots (collected here, computed by the scheduler)
        jobs = [job for (i, group, p, _), t in zip(params, steps) for job in self._due_roots(i, p, group, t)]
        # roots L^(-1/p): inline, or results of earlier background jobs that apply now
        self._install_roots(self.scheduler.run(self.global_step, jobs))
        # M ← β₁M + (1−β₁)G;  Ĝ = M/(1−β₁ᵗ);  D ← graft(Ĝ)
        xs, ds = self._graft(params, grads, steps)
        # eigenvalue-corrected: V ← β₂V + (1−β₂)G² and Adam's Ĝ/(√V̂+ε), for blocks without a basis
        corrected = self._second_moments(params, grads, xs, steps)
        # P ← Ĝ ×ᵢ L_i^(-1/p);  P ← P·‖D‖/‖P‖  (P = D for a block without roots)
        # eigenvalue-corrected: V ← β₂V + (1−β₂)G̃²;  P ← (Ĝ ×ᵢ Q_iᵀ)/(√V̂+ε) ×ᵢ Q_i  (eigen.py)
        directions = self._buckets.directions(grads, xs, ds, corrected)
        self._keep_second_moments(params, corrected)
        # B ← μB + P
        directions = self._momentum(params, directions)
        if self._sharding is not None:  # every rank gets the update of what it holds
            directions = self._share(every, params, directions)
        # W ← W(1 − lr·λ) − lr·P, on this rank's shard of each parameter
        self._apply_updates(every, directions)
        return loss

    def owners(self) -> list[int]:
        """The rank that computes each parameter's update (param_groups order; all zeros without
        sharding), or its first rows where ranks split it (:meth:`rows`)."""
        return [pieces[0][0] for pieces in self.rows()]

    def rows(self) -> list[list[Piece]]:
        """Who computes what of each parameter (param_groups order): its pieces ``(rank, lo, hi)``,
        rows ``lo … hi-1`` of its merged axis 0 (its first dim that is not 1), in row order.
        A pure function of the shapes, the options and the world size, the same on every rank;
        cached until the plans change.

        - Plain parameters (DDP, ZeRO-1) and FSDP2 ``"lossless"`` DTensors: the blocks' rows of
          all of them, in order, are cut into one run per rank of about equal cost
          (:func:`~scalable_shampoo.distributed.split_rows`), never inside a block. Most
          parameters are one piece; one that straddles a cut is split by rows between ranks
          (at most W−1 of them). Without a block split along axis 0 (a vector, an embedding
          table whose vocabulary axis keeps no statistic, a DTensor whose first dim is 1) a
          parameter stays whole.
        - FSDP2 ``"local"``: each rank its own shards (under HSDP, a rank of its replica
          group, chosen by greedy balance of the costs among the replicas); the piece is the
          shard's rows.
        """
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        plans = [(self._shard_plan(p, g), g["precondition_frequency"]) for p, g in params]
        if self._sharding is None:
            return [[(0, 0, _height(plan))] for plan, _ in plans]
        key = (self._sharding.world, self.fsdp, plans)
        if self._owner_cache[0] != key:
            local = [self._is_local(p) for p, _ in params]
            costs = [param_cost(*pf) for pf in plans]
            owners = [0] * len(params)
            replicas: dict[tuple[int, ...], list[int]] = {}  # "local": who shares this rank's shards
            for i, (p, _) in enumerate(params):
                if local[i]:
                    g = self._grids[p]
                    replicas.setdefault(tuple(line[g.where(self._sharding.rank)[1]] for line in g.ranks), []).append(i)
            for column, items in replicas.items():
                for i, r in zip(items, assign_owners([costs[i] for i in items], len(column))):
                    owners[i] = column[r]
            units = [row_costs(plan, f) if not isinstance(p, DTensor) or p.shape[0] == _height(plan) else
                     [(0, _height(plan), param_cost(plan, f))] for (p, _), (plan, f) in zip(params, plans)]  # fmt: skip
            split = iter(split_rows([u for u, lo in zip(units, local) if not lo], self._sharding.world))
            pieces = [[(o, 0, _height(pf[0]))] if lo else next(split) for lo, o, pf in zip(local, owners, plans)]
            rank = self._sharding.rank
            self._split = {p: (lo, hi) for (p, _), ps in zip(params, pieces) if len(ps) > 1
                           for r, lo, hi in ps if r == rank}  # fmt: skip
            self._owner_cache = (key, pieces)
        return self._owner_cache[1]

    def _rows_under(self, groups: list[dict[str, Any]]) -> list[list[Piece]]:
        """:meth:`rows` as it will be once ``groups`` (a checkpoint's settings) are loaded:
        the split weighs settings that a load takes from the checkpoint (the root frequency)."""
        kept = self.param_groups
        self.param_groups = [{**s, "params": g["params"]} for s, g in zip(groups, kept)]
        try:
            return list(self.rows())
        finally:
            self.param_groups = kept

    def _owns(self, index: int, block: int) -> bool:
        """Whether this rank computes block ``block`` of parameter ``index`` (and keeps its state)."""
        rank = self._sharding.rank if self._sharding is not None else 0
        pieces = self.rows()[index]
        if len(pieces) == 1:
            return pieces[0][0] == rank
        p, group = [(p, g) for g in self.param_groups for p in g["params"]][index]
        plan = self._work_plan(p, group) if p in self._split else None
        return plan is not None and plan.first <= block < plan.first + len(plan.blocks)

    def _is_local(self, p: Tensor) -> bool:
        """Whether ``p``'s update is computed from this rank's shard (FSDP2 ``"local"``)."""
        return self.fsdp == "local" and isinstance(p, DTensor)

    def _shard_plan(self, p: Tensor, group: dict[str, Any]) -> BlockPlan:
        """The plan of ``p``'s state as a checkpoint holds it: of this rank's shard under FSDP2
        ``"local"``, else of the whole parameter (:meth:`plan`)."""
        return self.plan(_local(p) if self._is_local(p) else p, group)

    def _work_plan(self, p: Tensor, group: dict[str, Any]) -> BlockPlan:
        """The plan of what this rank preconditions of ``p``: :meth:`_shard_plan`, or its rows
        of it where ranks split ``p`` (:meth:`rows`; call that first)."""
        plan = self._shard_plan(p, group)
        rows = self._split.get(p)
        return plan if rows is None else rows_plan(plan, *rows)

    def _my_rows(self, p: Tensor, group: dict[str, Any], t: Tensor) -> Tensor:
        """This rank's rows of ``t`` (shaped like ``p``) where ranks split ``p``, else ``t``."""
        rows = self._split.get(p)
        return t if rows is None else t.reshape(self._shard_plan(p, group).merged)[rows[0] : rows[1]]

    def _my_work(self, every: list[ParamGrad]) -> tuple[list[ParamGrad], list[Tensor]]:
        """The parameters (with the gradients G) whose updates this rank computes; of a
        parameter split among ranks, this rank's rows of it."""
        if self._sharding is None:
            return every, [self._gradient(p, grad, group) for _, group, p, grad in every]
        pieces, rank = self.rows(), self._sharding.rank
        whole: dict[int, Tensor] = {}  # "lossless": this rank's rows of parameters, gathered from their holders
        lossless = [pg for pg in every if isinstance(pg[2], DTensor) and not self._is_local(pg[2])]
        if lossless:
            shards = {i: self._gradient(p, grad, group) for i, group, p, grad in lossless}
            items = [(i, group, p, piece) for i, group, p, _ in lossless for piece in pieces[i]]
            got = to_owners(self._sharding, self.global_step, [self._grids[p] for _, _, p, _ in items],
                            [piece for *_, piece in items], [p.shape for _, _, p, _ in items],
                            [shards[i] for i, *_ in items])  # fmt: skip
            for (i, group, p, (_, lo, hi)), g in zip(items, got):
                if g is not None:  # this rank's piece: shaped as its plan's merged rows where p is split
                    whole[i] = g if len(pieces[i]) == 1 else g.reshape(hi - lo, *self._shard_plan(p, group).merged[1:])
        params, grads = [], []
        for i, group, p, grad in every:
            if i in whole:
                g = whole[i]
            elif any(r == rank for r, *_ in pieces[i]) and not isinstance(p, DTensor):
                g = self._my_rows(p, group, self._gradient(p, grad, group))
            elif any(r == rank for r, *_ in pieces[i]) and self._is_local(p) and grad.numel() > 0:
                g = self._gradient(p, grad, group)  # "local": a shard may have no rows
            else:
                continue
            params.append((i, group, p, g))
            grads.append(g)
        return params, grads

    def _share(self, every: list[ParamGrad], params: list[ParamGrad], mine: list[Tensor]) -> list[Tensor]:
        """The update (P after momentum) of this rank's part of ``every`` parameter, from the
        updates ``mine`` of the ``params`` (or rows) it computed: one ``all_gather`` of those of
        replicated parameters (ZeRO-1), one ``all_to_all`` of the rows of FSDP2 ``"lossless"``
        ones, and under HSDP ``"local"`` one ``all_gather`` in the replica group."""
        sh = self._sharding
        assert sh is not None
        pieces, by_index = self.rows(), {i: d for (i, *_), d in zip(params, mine)}
        owners = [ps[0][0] for ps in pieces]
        out: dict[int, Tensor] = {}
        plain = [pg for pg in every if not isinstance(pg[2], DTensor)]
        if plain:
            items, shapes = [], []  # every piece of every plain parameter, in order
            for i, group, p, g in plain:
                dtype = sh.communication_dtype or self._state_dtype(p)
                merged = self._shard_plan(p, group).merged
                for r, lo, hi in pieces[i]:
                    items.append((i, r))
                    shapes.append((torch.Size(g.shape if len(pieces[i]) == 1 else (hi - lo, *merged[1:])), dtype))
            got = sh.share(self.global_step, [r for _, r in items], shapes,
                           [sh.wire(by_index[i]) for i, r in items if r == sh.rank])  # fmt: skip
            parts: dict[int, list[Tensor]] = {}
            for (i, _), d in zip(items, got):
                parts.setdefault(i, []).append(d)
            out |= {i: ds[0] if len(ds) == 1 else torch.cat(ds).view(p.shape)
                    for (i, _, p, _), ds in zip(plain, parts.values())}  # fmt: skip
        lossless = [pg for pg in every if isinstance(pg[2], DTensor) and not self._is_local(pg[2])]
        if lossless:
            owned = [(i, p, piece) for i, _, p, _ in lossless for piece in pieces[i]]
            wires = [sh.communication_dtype or self._state_dtype(p) for _, p, _ in owned]
            sent: list[Tensor | None] = [sh.wire(by_index[i]).reshape(hi - lo, *p.shape[1:]) if r == sh.rank else None
                                         for i, p, (r, lo, hi) in owned]  # fmt: skip
            back = from_owners(sh, self.global_step, [self._grids[p] for _, p, _ in owned], [pc for *_, pc in owned],
                               [p.shape for _, p, _ in owned], wires, sent)  # fmt: skip
            rows: dict[int, list[Tensor]] = {i: [] for i, *_ in lossless}
            for (i, p, _), part, dtype in zip(owned, back, wires):  # this rank's rows, of each piece that has some
                none = torch.empty((0, *p.shape[1:]), dtype=dtype, device=p.device)
                rows[i].append(part if part is not None else none)
            out |= {i: torch.cat(rs) if len(rs) > 1 else rs[0] for i, rs in rows.items()}
        out |= {i: g for i, _, p, g in every if self._is_local(p) and g.numel() == 0}  # no rows here: nothing
        local = [pg for pg in every if self._is_local(pg[2]) and pg[3].numel() > 0]
        if local and len(self._grids[local[0][2]].ranks) > 1:  # HSDP: the replicas share the work
            out |= self._share_replicas(local, owners, by_index)
        else:
            out |= {i: by_index[i] for i, *_ in local}
        return [out[i] for i, *_ in every]

    def _share_replicas(self, local: list[ParamGrad], owners: list[int], mine: dict[int, Tensor]) -> dict[int, Tensor]:
        """FSDP2 ``"local"`` under HSDP: the updates of this rank's shards, computed by the
        ranks of its replica group (one ``all_gather`` in the mesh's replicate dim)."""
        assert self._sharding is not None
        p0 = local[0][2]
        assert isinstance(p0, DTensor)
        g = self._grids[p0]
        if p0.device_mesh not in self._replicas:
            assert g.replicate_dim is not None
            self._replicas[p0.device_mesh] = Sharding(p0.device_mesh.get_group(g.replicate_dim),
                                                     self._sharding.communication_dtype)  # fmt: skip
        rep = self._replicas[p0.device_mesh]
        column = [line[g.where(self._sharding.rank)[1]] for line in g.ranks]
        shapes = [(torch.Size(grad.shape), rep.communication_dtype or self._state_dtype(p)) for _, _, p, grad in local]
        got = rep.share(self.global_step, [column.index(owners[i]) for i, *_ in local], shapes,
                        [rep.wire(mine[i]) for i, *_ in local if i in mine])  # fmt: skip
        return {i: d for (i, *_), d in zip(local, got)}

    def _gradient(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """G (+ λW with L2 weight decay) of this rank's part of ``p``: all of it, or its shard."""
        g = grad.to(self._state_dtype(p))
        if group["weight_decay"] and not group["decoupled_weight_decay"]:
            g = g.add(_local(p).to(g.dtype), alpha=group["weight_decay"])  # L2: G ← G + λW (of this shard)
        return g

    def _count_steps(self, params: list[ParamGrad]) -> list[int]:
        """t ← t + 1 for every parameter with a gradient; returns the new counts."""
        steps = []
        for _, _, p, _ in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0, dtype=torch.int64)
            state["step"] += 1
            steps.append(int(state["step"]))
        return steps

    def _entries(self, params: list[ParamGrad], grads: list[Tensor]) -> list[Entry]:
        """What the engine stacks: each parameter's plan, dtypes, device, β₂ and rescaling."""
        return [
            Entry(p, self._work_plan(p, group), Spec(g.dtype, g.device, group["root_storage_dtype"] or g.dtype,
                                                     group["betas"][1], _grafting(group) is not GraftingType.NONE,
                                                     self._eigen_p(group), _rotated_first_moment(group),
                                                     group["packed_storage"]))
            for (_, group, p, _), g in zip(params, grads)
        ]  # fmt: skip

    def _due_roots(self, index: int, p: Tensor, group: dict[str, Any], step: int) -> list[RootJob]:
        start, every = group["start_preconditioning_step"], group["precondition_frequency"]
        if step < start or (step - start) % every:
            return []
        state, plan, opts = self.state[p], self._work_plan(p, group), self._root_options(group)
        qr = replace(opts, qr_refresh=True)
        jobs = []
        for b, block in enumerate(plan.blocks, plan.first):
            for a in block.axes:
                exponent = block.exponent(group["exponent_override"])
                stat = packed_statistic(state[packed_key(b, a)]) if group["packed_storage"] else state[stat_key(b, a)]
                if self._qr_refresh(group, state, b, a):  # L·Q_prev (columns reversed), here; the job: its QR
                    lq = stat @ state[basis_key(b, a)].to(stat.dtype).flip(-1)
                    jobs.append(RootJob((index, b, a), step, lq, exponent, qr))
                else:
                    jobs.append(RootJob((index, b, a), step, stat, exponent, opts))
        return jobs

    def _install_roots(self, outcomes: list[RootOutcome]) -> None:
        """Install each accepted root (into its stack) and record every attempt's :class:`RootInfo`."""
        if not outcomes:
            return
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for out in outcomes:
            index, b, a = out.key
            p, group = params[index]
            state = self.state[p]
            info = RootInfo.from_tensor(state.get(info_key(b, a)))
            rejected, installed = info.rejected, info.installed_step
            if out.ok:  # into the bucket's stack, or its own storage if the block is not stacked now
                view = self._buckets.install_root(p, b, a, out.root)
                storage = group["root_storage_dtype"] or out.root.dtype
                if group["packed_storage"]:  # the root's diagonal; its strict upper triangle is in packed.*
                    state[diag_key(b, a)] = view if view is not None else pack_root_(state[packed_key(b, a)], out.root)
                else:
                    slot = basis_key if _corrected(group) else root_key
                    state[slot(b, a)] = view if view is not None else out.root.to(storage, copy=True)
                state[method_key(b, a)] = out.method
                installed = out.step
            elif out.lambda_max != 0:  # the previous root, if any, stays in use
                rejected += 1  # (a zero statistic, say of embedding rows never looked up, has no root: not a failure)
            residual = out.residual if math.isfinite(out.residual) else -1.0  # stored state stays finite
            info = RootInfo(out.step, residual, out.lambda_max, out.eps, rejected, installed)
            state[info_key(b, a)] = info.to_tensor()

    def diagnostics(self) -> dict[str, Any]:
        """Per-block health of the preconditioner. Reads CPU-side state only: no device sync.

        Returns ``{"global_step", "skipped_steps", "blocks": [row, …]}`` with one
        row per (parameter, block, axis) that keeps a statistic:

        - ``param``, ``block``, ``axis``, ``dim``: which statistic (param index in
          param_groups order), and its size;
        - ``step``: the parameter's step now; ``has_root``: whether a root is installed;
        - ``root_step``: the step whose statistic the installed root came from, and
          ``staleness = step − root_step``;
        - ``last_attempt_step``, ``residual`` (max|X^p·A·V − V| on probe vectors), ``lambda_max``,
          ``eps`` (ε_eff): of the most recent root computation, accepted or not;
        - ``rejected``: roots rejected so far; ``method``: the fallback stage that
          produced the installed root (e.g. ``"eigh/fp32"``).
        """
        return diagnostics(self)

    def plan_table(self, model: torch.nn.Module | None = None) -> PlanTable:
        """What Shampoo chose for each parameter: merged shape, blocks, the dims of each
        preconditioned axis, statistic sizes and their cost; ``print()`` it for a table,
        or read its ``rows``. ``model`` names the parameters (else ``group.index``)."""
        return plan_table(self, model)

    def memory(self) -> dict[str, int]:
        """Bytes of optimizer state by kind (statistics, roots, first_moment, grafting,
        momentum, other, scratch) and the parameters' bytes, each storage counted once."""
        return memory(self)

    @staticmethod
    def _fused(params: list[ParamGrad]) -> list[list[int]]:
        """Positions in ``params`` that one ``torch._foreach_*`` op can take together: the
        same param group, device and dtype (and DTensor or not)."""
        out: dict[tuple[Any, ...], list[int]] = {}
        for pos, (_, group, p, _) in enumerate(params):
            out.setdefault((id(group), p.device, p.dtype, isinstance(p, DTensor)), []).append(pos)
        return list(out.values())

    def _buffer(self, p: Tensor, key: str, like: Tensor) -> Tensor:
        """``state[p][key]``, created as zeros like ``like`` (not setdefault: that allocates every step)."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(like)
        return state[key]

    def _graft(
        self, params: list[ParamGrad], grads: list[Tensor], steps: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(Ĝ, D) of every parameter: the filtered gradient and the grafting update."""
        xs, ds = list(grads), list(grads)
        for pos in self._fused(params):
            group = params[pos[0]][1]
            ps, gs = [params[i][2] for i in pos], [grads[i] for i in pos]
            beta1, kind = group["betas"][0], _grafting(group)
            gb2 = group["grafting_beta2"] if group["grafting_beta2"] is not None else group["betas"][1]
            ms = [self._buffer(p, "exp_avg", g) for p, g in zip(ps, gs)] if beta1 > 0 else []
            if _rotated_first_moment(group):  # M is updated per block in _second_moments
                ms = [m.clone() for m in ms]
            accs = [self._buffer(p, "graft_acc", g) for p, g in zip(ps, gs)] if kind.has_accumulator else []
            plans = [self._work_plan(p, group) for p in ps]
            if self.compile_elementwise and not kind.normalized:  # step counts as tensors: no recompiles
                ts: list[Any] = [self.state[p]["step"] for p in ps]
                stage = compiled(graft_stage_)
            else:
                ts, stage = [steps[i] for i in pos], graft_stage_
            x, d = stage(kind, beta1, gb2, group["eps"], gs, ms, accs, ts, plans)
            for i, xi, di in zip(pos, x, d):
                xs[i], ds[i] = xi, di
        return xs, ds

    def _second_moments(
        self, params: list[ParamGrad], grads: list[Tensor], xs: list[Tensor], steps: list[int]
    ) -> list[Corrected | None] | None:
        """For eigenvalue-corrected parameters: V's update and Adam's direction with no basis
        (``graft_directions``' Adam rule on a copy of V; the engine overwrites the blocks that
        have a basis). None at other positions; None if no group is eigenvalue-corrected."""
        if not any(_corrected(g) for g in self.param_groups):
            return None
        out: list[Corrected | None] = [None] * len(params)
        for pos in self._fused(params):
            group = params[pos[0]][1]
            if not _corrected(group):
                continue
            ps, gs, ts = [params[i][2] for i in pos], [grads[i] for i in pos], [steps[i] for i in pos]
            vs = [self._buffer(p, "exp_avg_sq", g) for p, g in zip(ps, gs)]
            v_new = [v.clone() for v in vs]
            (beta1, beta2), eps, p_ = group["betas"], group["eps"], self._eigen_p(group)
            ms: list[Tensor | None] = [None] * len(pos)
            m_new: list[Tensor | None] = [None] * len(pos)
            if _rotated_first_moment(group):  # M per block in its basis: its identity-basis update here
                ms = [self.state[p]["exp_avg"] for p in ps]
                m_new = [m.clone() for m in ms]  # type: ignore[union-attr]
                first_moment_(m_new, gs, beta1, ts)  # type: ignore[arg-type]
            adam = graft_directions(GraftingType.ADAM, gs, [xs[i] for i in pos], v_new, steps=ts, beta2=beta2,
                                    eps=eps, plans=[self._work_plan(p, group) for p in ps])  # fmt: skip
            for i, t, v, vn, m, mn, a in zip(pos, ts, vs, v_new, ms, m_new, adam):
                bias = float(bias_correction(beta2, t)) ** (1 / p_) if beta2 < 1 else 1.0
                out[i] = Corrected(a, v, vn, eps, bias, m, mn, beta1, float(bias_correction(beta1, t)))
        return out

    def _keep_second_moments(self, params: list[ParamGrad], corrected: list[Corrected | None] | None) -> None:
        """Store each eigenvalue-corrected parameter's new V."""
        for (_, _, p, _), c in zip(params, corrected or []):
            if c is not None:
                self.state[p]["exp_avg_sq"] = c.v_new
                if c.m_new is not None:
                    self.state[p]["exp_avg"] = c.m_new

    def _momentum(self, params: list[ParamGrad], directions: list[Tensor]) -> list[Tensor]:
        """B ← μB + P (B starts as P); the direction is B, or P + μB with Nesterov."""
        out = list(directions)
        for pos in self._fused(params):
            group = params[pos[0]][1]
            if group["momentum"] > 0:
                states = [self.state[params[i][2]] for i in pos]
                bufs = [st.get("momentum_buffer") for st in states]
                bufs, dirs = heavy_ball_(bufs, [out[i] for i in pos], group["momentum"], group["nesterov"])
                for st, buf in zip(states, bufs):
                    st["momentum_buffer"] = buf
                for i, d in zip(pos, dirs):
                    out[i] = d
        return out

    def _apply_updates(self, params: list[ParamGrad], directions: list[Tensor]) -> None:
        """W ← W(1 − lr·λ) − lr·P, fused per group of tensors."""
        for pos in self._fused(params):
            group = params[pos[0]][1]
            ps = [_local(params[i][2]) for i in pos]  # a DTensor's shard: its rows of the update came here
            dirs = [directions[i].to(ps[k].dtype) for k, i in enumerate(pos)]
            decay = group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
            lr = float(group["lr"])  # a Tensor lr: its value, bit-identical to that float
            if self.compile_elementwise:  # the lr as a tensor: a schedule does not recompile
                compiled(weight_update_)(ps, dirs, torch.tensor(lr, dtype=torch.float64), decay)
            else:
                weight_update_(ps, dirs, lr, decay)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the scheduler's workers, if any. The optimizer can't step after this."""
        self.scheduler.close()
