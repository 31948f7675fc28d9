"""The optimizer state layout, its format version, and a dtype-preserving save/load.

``state_dict()`` is torch's, plus one top-level entry. Per parameter, the state
holds plain tensors under these keys (``b`` is the block index in the
parameter's :class:`~scalable_shampoo.blocks.BlockPlan`, ``a`` the axis):

==========================  ===================================================
key                         what
==========================  ===================================================
``step``                    int64 0-d CPU tensor, steps taken by this parameter
``exp_avg``                 first moment M (when β₁ > 0)
``graft_acc``               grafting accumulator v (AdaGrad, RMSprop, Adam)
``momentum_buffer``         heavy-ball buffer B (when momentum > 0)
``stat.{b}.{a}``            statistic H_a of block b (fp32; fp64 for fp64 params)
``root.{b}.{a}``            installed inverse root (absent until the first one), in
                            ``root_storage_dtype`` (default: the statistic's dtype)
``basis.{b}.{a}``           eigenvalue-corrected preconditioner only, instead of
                            ``root.*``: the installed eigenvectors Q of the statistic
                            (columns, eigenvalues ascending), in ``root_storage_dtype``
``packed.{b}.{a}``          ``packed_storage=True`` only, instead of ``stat.*`` and ``root.*``:
                            one n×n matrix, H_a in its lower triangle (with the diagonal) and
                            the installed root's strict upper triangle above it (zeros until
                            the first root); see ``kronecker.pack_root_``
``root_diag.{b}.{a}``       ``packed_storage=True`` only: the installed root's diagonal (n
                            numbers; absent until the first root)
``exp_avg_sq``              eigenvalue-corrected only: the second moment V, shaped like
                            the parameter; a block's entries are in its current basis
                            (the original one until the block has a basis on every axis)
``root_info.{b}.{a}``       a :class:`RootInfo` (of the root or the basis) as a float64 CPU tensor ``[last attempt's``
                            ``step, residual or -1, λ_max, ε_eff, rejected so far,``
                            ``step of the installed root or -1]``: finite always
``root_method.{b}.{a}``     the fallback stage of the installed root, e.g. ``"eigh/fp32"``
==========================  ===================================================

With ``Shampoo(batched=True)`` (the default) the ``stat.*`` and ``root.*`` tensors
are views of per-bucket stacks ``[B, n, n]`` (``buckets.py``): ``torch.save`` stores
each stack once, a loaded tensor gets its own storage, and the optimizer re-stacks
them at its next step (``packed.*`` and ``root_diag.*`` alike). The layout of a
checkpoint does not depend on ``batched``.

The top-level entry ``"scalable_shampoo"`` holds ``format_version``,
``global_step``, ``skipped_steps`` and the scheduler's pending results.
Format 2 plans parameters by fan-in grouping (``blocks.py``). A format-1 checkpoint
(dims merged from the left) loads only where a parameter's plan is the same under
both rules; any other parameter is refused by name (its statistics can't be converted).

**What must match** (:func:`check_groups`, before anything changes): the param groups'
sizes, the parameters' shapes and dtypes, and the settings that lay out the state
(:data:`PLAN_SETTINGS` where they change a parameter's plan; β₁ = 0 or not, grafting
with or without an accumulator, momentum = 0 or not). ``packed_storage`` stays the optimizer's, and the
saved statistics and roots are converted to its layout (:func:`relayout`). Any other setting is taken from
the checkpoint, as ``torch.optim`` does. A mismatch raises a ``ValueError`` naming
the parameter or param group, the setting, and the saved and current values.

**Across versions** (``FORMATS`` below): a checkpoint of any format in the table
loads, and a param group that lacks a setting added later gets the setting's
constructor default (:meth:`Shampoo.group_defaults`); a newer or unknown format is
refused with a ``ValueError``, before anything changes. Format 1 as first released
kept 5 numbers per ``root_info``; such entries get a 6th on load. One frozen
checkpoint per writer of each format is kept in ``tests/checkpoints/``.

``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the
parameter's dtype (pytorch#43706), which would truncate fp32 statistics under
bf16 parameters. The hooks here put back each tensor exactly as it was saved.
"""

from __future__ import annotations

import math
import os
import tempfile
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .blocks import rows_plan

if TYPE_CHECKING:
    from .optimizer import Shampoo

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "PLAN_SETTINGS",
    "TOP_KEY",
    "RootInfo",
    "StateCodec",
    "atomic_save",
    "basis_key",
    "check_format",
    "check_groups",
    "diag_key",
    "diagnostics",
    "info_key",
    "method_key",
    "packed_key",
    "root_key",
    "stat_key",
    "stat_slot",
]

# Every checkpoint format this library reads, and what a checkpoint in it lacks compared
# with today's; the load hook below fills or checks each gap. Today's format is the newest
# one. Bumping it is one line: add the new version with nothing lacking, and name what the
# old one lacks (then handle that name in ``StateCodec._check_and_keep``). A format that
# is not in this table is refused: a newer one asks for a newer scalable_shampoo.
FORMATS: dict[int, tuple[str, ...]] = {
    1: ("fan-in plans",),  # dims merged from the left: a parameter loads only where its plan is unchanged
    2: (),  # today's: fan-in grouping (blocks.py)
}
FORMAT_VERSION = max(FORMATS)
TOP_KEY = "scalable_shampoo"


# The per-block keys, built here alone: block b, axis a.
def stat_key(block: int, axis: int) -> str:  # the statistic H_a of block b
    return f"stat.{block}.{axis}"


def root_key(block: int, axis: int) -> str:  # its installed inverse root
    return f"root.{block}.{axis}"


def basis_key(block: int, axis: int) -> str:  # its installed eigenbasis (eigenvalue-corrected)
    return f"basis.{block}.{axis}"


def packed_key(block: int, axis: int) -> str:  # ``packed_storage``: H_a and its root's strict upper triangle
    return f"packed.{block}.{axis}"


def diag_key(block: int, axis: int) -> str:  # ``packed_storage``: the installed root's diagonal
    return f"root_diag.{block}.{axis}"


def stat_slot(group: dict[str, Any]) -> Any:
    """The key function of the entries that hold a block's statistic under ``group``'s layout."""
    return packed_key if group.get("packed_storage") else stat_key


def info_key(block: int, axis: int) -> str:  # its RootInfo, as a float64 CPU tensor
    return f"root_info.{block}.{axis}"


def method_key(block: int, axis: int) -> str:  # the fallback stage of its installed root
    return f"root_method.{block}.{axis}"


def block_of(key: str) -> int | None:
    """The block of a per-block state key (above), else None."""
    head, _, rest = key.partition(".")
    return int(rest.split(".")[0]) if head in _BLOCK_HEADS else None


_BLOCK_HEADS = ("stat", "root", "basis", "packed", "root_diag", "root_info", "root_method")


# The elementwise buffers, shaped like the parameter (a rank's rows of it where ranks split it)
ELEMENTWISE = ("exp_avg", "exp_avg_sq", "graft_acc", "momentum_buffer")


def rows_state(state: dict[str, Any], plan: Any, lo: int, hi: int) -> dict[str, Any]:
    """What a rank keeps of a parameter's whole ``state`` (planned by ``plan``) when it computes
    rows ``lo … hi-1`` of it: the entries of those rows' blocks and those rows of the
    elementwise buffers (views), and the rest (the step) as it is."""
    sub = rows_plan(plan, lo, hi)
    out = {}
    for k, v in state.items():
        b = block_of(k)
        if k in ELEMENTWISE:  # (rows that come alone, from a sharded checkpoint, are this rank's already)
            out[k] = v.reshape(plan.merged)[lo:hi] if v.numel() == math.prod(plan.merged) else v
        elif b is None or sub.first <= b < sub.first + len(sub.blocks):
            out[k] = v
    return out


def merge_rows(parts: list[dict[Any, dict[str, Any]]], shapes: list[tuple[int, ...]]) -> dict[Any, dict[str, Any]]:
    """The ranks' state entries (``parts``, in rank order, keyed by parameter index) as one
    process's: a parameter that ranks split by rows gets its blocks' entries from each, and
    its elementwise buffers joined in row order (a lower rank holds lower rows)."""
    out: dict[Any, dict[str, Any]] = {}
    rows: dict[tuple[Any, str], list[torch.Tensor]] = {}
    for part in parts:
        for pid, st in part.items():
            have = out.setdefault(pid, {})
            for k, v in st.items():
                if k in ELEMENTWISE:
                    rows.setdefault((pid, k), []).append(v)
                else:
                    have.setdefault(k, v)
    for (pid, k), vs in rows.items():
        out[pid][k] = vs[0] if len(vs) == 1 else torch.cat(vs).view(shapes[pid])
    return out


def relayout(state: dict[str, Any], packed: bool) -> dict[str, Any]:
    """One parameter's ``state`` with its statistics and roots moved to the packed layout
    (``packed``, ``packed_storage=True``) or to the default one; every other entry as it is.
    Packing keeps a statistic's lower triangle (its own upper triangle, equal up to rounding,
    is dropped) and a root's upper one, in the statistic's dtype; unpacking mirrors the lower
    triangle into a full statistic and rebuilds the full root. So unpacking then packing again
    gives back the same tensors."""
    from .kronecker import pack_root_, packed_statistic, unpack_root

    out: dict[str, Any] = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in (("stat", "root") if packed else ("packed", "root_diag")):
            if head in ("stat", "packed"):
                b, a = map(int, rest.split("."))
                if packed:
                    out[packed_key(b, a)] = m = v.tril()
                    if (root := state.get(root_key(b, a))) is not None:
                        out[diag_key(b, a)] = pack_root_(m, root.to(v.dtype))
                else:
                    out[stat_key(b, a)] = packed_statistic(v)
                    if (diag := state.get(diag_key(b, a))) is not None:
                        upper = torch.ones(v.shape, dtype=torch.bool, device=v.device).triu_(1)
                        out[root_key(b, a)] = unpack_root(v, diag, upper, torch.empty_like(v))
        else:
            out[k] = v
    return out


class RootInfo(NamedTuple):
    """What is known of one statistic's roots, stored as a float64 CPU tensor in this order.
    Every value is finite (a check that the state is finite passes): -1 stands for none."""

    last_attempt_step: float = 0.0  # the step of the statistic the last computation used
    residual: float = -1.0  # max|X^p·A·V − V| on probe vectors (-1: not finite, or a zero statistic)
    lambda_max: float = 0.0
    eps: float = 0.0  # ε_eff of the last computation
    rejected: float = 0.0  # roots rejected so far
    installed_step: float = -1.0  # the step of the statistic the installed root came from (-1: none yet)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(self, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor | None) -> RootInfo:
        return cls() if t is None else cls(*t.tolist())


def _on_cpu(key: str) -> bool:
    return key == "step" or key.startswith("root_info.")


class StateCodec:
    """State-dict hooks that add the format version and undo torch's dtype cast."""

    @staticmethod
    def attach(opt: Shampoo) -> None:
        opt.register_state_dict_post_hook(StateCodec._save)  # type: ignore[arg-type]
        opt.register_load_state_dict_pre_hook(StateCodec._check_and_keep)  # type: ignore[arg-type]
        opt.register_load_state_dict_post_hook(StateCodec._restore)  # type: ignore[arg-type]

    @staticmethod
    def _save(opt: Shampoo, sd: dict[str, Any]) -> dict[str, Any]:
        scheduler = opt.scheduler.state_dict()
        if opt._sharding is not None:  # a collective: every owner's entries, every rank's pending roots
            from .distributed import merge_pending

            shapes = [tuple(p.shape) for g in opt.param_groups for p in g["params"]]
            sd["state"] = merge_rows(opt._sharding.gather_objects(sd["state"]), shapes)
            scheduler = merge_pending(opt._sharding.gather_objects(scheduler))
        sd[TOP_KEY] = {
            "format_version": FORMAT_VERSION,
            "global_step": opt.global_step,
            "skipped_steps": opt.skipped_steps,
            "scheduler": scheduler,
        }
        return sd

    @staticmethod
    def _check_and_keep(opt: Shampoo, sd: dict[str, Any]) -> None:
        meta = sd.get(TOP_KEY)
        version = check_format(meta)
        # FORMATS[version] names what this checkpoint lacks; each gap is filled or checked
        # here, before anything changes (format 2, today's, lacks nothing)
        saved_groups = check_groups(opt, sd["param_groups"])
        # packed_storage is this optimizer's, not the checkpoint's: the state is converted to it
        # below (packed roots are fp32: a packed optimizer takes no root_storage_dtype)
        was_packed = {id(s): bool(s["packed_storage"]) for s in saved_groups}
        for s, g in zip(saved_groups, opt.param_groups):
            s["packed_storage"] = g["packed_storage"]
            if g["packed_storage"]:
                s["root_storage_dtype"] = None
        sd["param_groups"] = saved_groups  # torch copied sd before this hook: the caller's dict is untouched
        sd["state"] = dict(sd["state"])
        params = chain.from_iterable(g["params"] for g in opt.param_groups)
        saved = list(chain.from_iterable(zip(s["params"], [s] * len(s["params"])) for s in saved_groups))
        layout = opt._rows_under(saved_groups)
        rank = opt._sharding.rank if opt._sharding is not None else 0
        for index, ((pid, group), p) in enumerate(zip(saved, params)):
            state = sd["state"].get(pid, {})
            if state and was_packed[id(group)] != group["packed_storage"]:
                state = sd["state"][pid] = relayout(state, group["packed_storage"])
            plan = opt._shard_plan(p, {**group, "params": [p]})  # fsdp="local": of this rank's shard
            if "fan-in plans" in FORMATS[version] and state:
                _check_format1_plan(pid, p, group, plan)
            stat = stat_slot(group)  # the statistic's entries: ``stat.*``, or ``packed.*`` (packed_storage)
            expected = {key(b, a): (blk.shape[a],) * 2 for b, blk in enumerate(plan.blocks) for a in blk.axes
                        for key in (stat, basis_key)}  # fmt: skip
            shape = tuple(p.to_local().shape if opt._is_local(p) else p.shape)
            needed = set(expected)
            mine = [(lo, hi) for r, lo, hi in layout[index] if r == rank]
            if len(layout[index]) > 1 and mine:  # ranks split it by rows: this rank's rows may come alone
                (lo, hi), whole = mine[0], shape
                sub = rows_plan(plan, lo, hi)
                needed = {stat(b, a) for b, blk in enumerate(sub.blocks, sub.first) for a in blk.axes}
                if any(torch.is_tensor(v) and tuple(v.shape) != whole for k, v in state.items() if k in ELEMENTWISE):
                    shape = (hi - lo, *plan.merged[1:])
            expected |= {k: shape for k in ELEMENTWISE}
            head = stat(0, 0).split(".")[0] + "."
            missing = [k for k in expected if k in needed and k.startswith(head) and k not in state]
            if state and ("step" not in state or missing):
                raise ValueError(
                    f"state_dict is missing {'step' if 'step' not in state else missing[0]!r} "
                    f"for parameter {pid} of shape {tuple(p.shape)}"
                )
            dtype = opt._state_dtype(p)
            # the elementwise buffers first: their shape is the parameter's shape in the checkpoint
            for k, v in sorted(state.items(), key=lambda kv: kv[0].startswith(head)):
                if torch.is_tensor(v) and (k in expected or k.startswith(head)):
                    if tuple(v.shape) != expected.get(k):
                        raise ValueError(
                            f"state_dict does not fit parameter {pid} of shape {tuple(p.shape)}: "
                            f"{k} has shape {tuple(v.shape)}, expected {expected.get(k)}"
                        )
                    if v.dtype != dtype:  # fp64 parameters keep fp64 state, all others fp32
                        raise ValueError(
                            f"state_dict does not fit parameter {pid} of dtype {p.dtype}: {k} has dtype "
                            f"{v.dtype}, expected {dtype} (was it saved for parameters of another dtype?)"
                        )
        opt.__dict__["_loaded"] = (sd, meta)  # handed to _restore, which pops it

    @staticmethod
    def _restore(opt: Shampoo) -> None:
        sd, meta = opt.__dict__.pop("_loaded")
        saved_ids = chain.from_iterable(g["params"] for g in sd["param_groups"])
        params = chain.from_iterable(g["params"] for g in opt.param_groups)
        layout, rank = opt.rows(), opt._sharding.rank if opt._sharding is not None else 0
        groups = chain.from_iterable([g] * len(g["params"]) for g in opt.param_groups)
        for index, (pid, p, group) in enumerate(zip(saved_ids, params, groups)):
            mine = [(lo, hi) for r, lo, hi in layout[index] if r == rank]
            if not mine:  # under sharding, another rank's parameter: keep nothing of it
                opt.state.pop(p, None)
                continue
            if pid not in sd["state"]:
                continue
            state = sd["state"][pid]
            if len(layout[index]) > 1:  # ranks split it by rows: this rank's blocks and rows
                state = rows_state(state, opt._shard_plan(p, group), *mine[0])
            opt.state[p] = {
                k: v.to(device="cpu" if _on_cpu(k) else p.device, copy=True) if torch.is_tensor(v) else v
                for k, v in state.items()
            }
            if not torch.is_tensor(opt.state[p]["step"]):  # a plain number, as torch.optim also accepts
                opt.state[p]["step"] = torch.tensor(int(opt.state[p]["step"]), dtype=torch.int64)
            _upgrade_root_info(opt.state[p])
        opt.global_step = int(meta["global_step"])
        opt.skipped_steps = int(meta["skipped_steps"])
        scheduler = meta["scheduler"]
        if opt._sharding is not None:
            from .distributed import filter_pending

            scheduler = filter_pending(scheduler, opt._owns)
        # a pending root goes to where its parameter is now (it may have been saved on another device)
        every = [p for g in opt.param_groups for p in g["params"]]
        pending = []
        for item in scheduler.get("pending", []):
            outcomes = [{**o, "device": str(every[int(o["key"][0])].device)} for o in item["outcomes"]]
            pending.append({**item, "outcomes": outcomes})
        opt.scheduler.load_state_dict({**scheduler, "pending": pending})


def check_format(meta: Any) -> int:
    """The format version of a checkpoint's top-level entry; a ``ValueError`` for one this
    library does not read (none, malformed, unknown, or newer than :data:`FORMAT_VERSION`)."""
    if not isinstance(meta, dict):
        raise ValueError(f"state_dict has no {TOP_KEY!r} entry: it was not saved by scalable_shampoo.Shampoo")
    version = meta.get("format_version")
    known = ", ".join(map(str, sorted(FORMATS)))
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"state_dict format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"state_dict format_version {version} is newer than this scalable_shampoo reads "
            f"(formats {known}): load it with the newer scalable_shampoo that wrote it"
        )
    if version not in FORMATS:
        raise ValueError(f"state_dict format_version {version} is not one this scalable_shampoo reads "
                         f"(formats {known})")  # fmt: skip
    return version


# The settings that fix the layout of a parameter's state: its plan (which statistics,
# of which shapes, under which keys) and the elementwise buffers it keeps. A checkpoint
# whose param group lays out some parameter's state otherwise than this optimizer's does
# is refused, naming the setting; every other setting is taken from the checkpoint, as
# torch.optim does (lr, eps, β₂, weight decay, root settings, frequencies, ...).
PLAN_SETTINGS = ("block_size", "max_preconditioner_dim", "merge_dims_bound", "precondition_axes", "precondition_1d")


def _buffers(group: dict[str, Any]) -> dict[str, tuple[str, Any, bool]]:
    """Each elementwise buffer: (the setting that decides it, its value, whether it is kept)."""
    from .grafting import GraftingType

    beta1, kind, momentum = group["betas"][0], group["grafting"], group["momentum"]
    corrected = group["preconditioner"] == "eigenvalue_corrected"
    return {
        "exp_avg_sq": ("preconditioner", group["preconditioner"], corrected),
        "exp_avg": ("betas[0]", beta1, beta1 > 0),
        "graft_acc": ("grafting", kind, GraftingType(kind).has_accumulator),
        "momentum_buffer": ("momentum", momentum, momentum > 0),
    }


def _describe(plan: Any) -> str:
    dims = [blk.shape[a] for blk in plan.blocks for a in blk.axes]
    stats = f"statistics of dims {sorted(set(dims))}" if dims else "no statistics"
    return f"{plan.merged} in {len(plan.blocks)} block(s), {len(dims)} {stats}"


def check_groups(opt: Shampoo, saved_groups: Any, shapes: list[tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """A checkpoint's param groups, checked against ``opt``'s, before anything is loaded.

    Returns them with every setting the checkpoint lacks filled with its default
    (:meth:`Shampoo.group_defaults`). Raises a ``ValueError`` naming what differs when
    the checkpoint has other param groups or other numbers of parameters, a parameter of
    another shape (``shapes``: the saved shapes, where the checkpoint records them), a bad
    setting, or a setting that lays out a parameter's state otherwise than ``opt``'s
    (:data:`PLAN_SETTINGS` where they change a parameter's plan; β₁ = 0 or not, grafting
    with or without an accumulator, momentum = 0 or not).
    """
    now_counts = [len(g["params"]) for g in opt.param_groups]
    saved_counts = [len(s["params"]) for s in saved_groups] if isinstance(saved_groups, list) else None
    if saved_counts != now_counts:
        raise ValueError(
            f"state_dict has different param groups than this optimizer: {saved_counts} parameters per group "
            f"in the checkpoint, {now_counts} here (is it from another model?); nothing was loaded"
        )
    # a setting written before it existed gets its default (Shampoo.group_defaults); the
    # groups are checked here, before anything changes, as the constructor checks them
    defaults = opt.group_defaults()
    saved_groups = [{**defaults, **s} for s in saved_groups]
    for s, g in zip(saved_groups, opt.param_groups):
        checked = {**s, "params": g["params"]}
        try:
            opt._validate(checked)
        except ValueError as exc:
            raise ValueError(f"state_dict has a bad param group setting: {exc}") from None
        s["grafting"] = checked["grafting"]  # a default (None) resolved for the group's preconditioner
    index = 0
    for gi, (s, g) in enumerate(zip(saved_groups, opt.param_groups)):
        for p in g["params"]:
            if shapes is not None and tuple(shapes[index]) != tuple(p.shape):
                raise ValueError(
                    f"state_dict is from another model: parameter {index} (param group {gi}) has shape "
                    f"{tuple(shapes[index])} in the checkpoint, {tuple(p.shape)} here; nothing was loaded"
                )
            old, new = opt.plan(p, {**s, "params": [p]}), opt.plan(p, g)
            if old != new:
                differ = [f"{k}={s[k]!r} in the checkpoint, {g[k]!r} here" for k in PLAN_SETTINGS if s[k] != g[k]]
                raise ValueError(
                    f"state_dict was saved with other settings: param group {gi} has {'; '.join(differ)}, so "
                    f"parameter {index} of shape {tuple(p.shape)} is {_describe(old)} in the checkpoint and "
                    f"{_describe(new)} here. These settings fix the state's shapes and keys: build the "
                    "optimizer with the checkpoint's; nothing was loaded"
                )
            index += 1
        if g["params"]:
            kept = _buffers(g)
            for key, (name, was, had) in _buffers(s).items():
                now, has = kept[key][1:]
                if had != has:
                    raise ValueError(
                        f"state_dict was saved with other settings: param group {gi} has {name}={was!r} in the "
                        f"checkpoint ({f'{key} kept' if had else f'no {key}'}), {name}={now!r} here "
                        f"({f'{key} kept' if has else f'no {key}'}). This setting decides which buffers the state "
                        "keeps: build the optimizer with the checkpoint's; nothing was loaded"
                    )
    return saved_groups


def _upgrade_root_info(state: dict[str, Any]) -> None:
    """Make every loaded ``root_info`` a 6-number, finite :class:`RootInfo`.

    Format 1 as first released kept 5 numbers (no step of the installed root): such an
    entry gets, as its 6th, the step of its last attempt if a root is installed (the first
    release did not record which attempt the root came from), or -1. Older checkpoints
    stored an infinite residual where none was measured: it becomes -1. Only
    :meth:`Shampoo.diagnostics` reads these numbers; the step's math does not."""
    for key, value in list(state.items()):
        if key.startswith("root_info.") and torch.is_tensor(value):
            info = value.tolist()
            if len(info) == 5:
                block, axis = map(int, key.split(".")[1:])
                info.append(info[0] if root_key(block, axis) in state else -1.0)
            if not math.isfinite(info[1]):
                info[1] = -1.0
            state[key] = RootInfo(*info).to_tensor()

def _check_format1_plan(pid: Any, p: torch.Tensor, group: dict[str, Any], plan: Any) -> None:
    """A format-1 checkpoint was saved under the left-merging rule. Its statistics load only
    where that rule planned the parameter exactly as fan-in grouping does: equal shapes are
    not enough ([8,8,8,8] under bound 512, block 8 is 64 blocks of 8×8 statistics under
    both rules, but of different dims). Statistics of other dims can't be converted."""
    from .blocks import make_plan

    bound = group["merge_dims_bound"] or group["block_size"]
    old = make_plan(tuple(p.shape), group["block_size"], group["max_preconditioner_dim"], bound,
                    group["precondition_1d"], None, "left")  # fmt: skip
    if old != plan:
        raise ValueError(
            f"state_dict has format_version 1, whose rule merged parameter {pid} of shape "
            f"{tuple(p.shape)} into {old.merged}; fan-in grouping merges it into {plan.merged}"
            f"{' (other dims)' if old.merged == plan.merged else ''}, so its statistics do not "
            "apply and can't be converted. Resume without this optimizer state, or drop this "
            "parameter's entry from state_dict['state'] to restart its statistics."
        )


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that a kill can't corrupt: write a temporary file beside
    ``path``, flush it to disk, then rename it over ``path`` in one step."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def diagnostics(opt: Shampoo) -> dict[str, Any]:
    """The rows of :meth:`Shampoo.diagnostics`, from CPU-side state only."""
    rows = []
    index = -1
    for group in opt.param_groups:
        for p in group["params"]:
            index += 1
            state = opt.state.get(p)
            if not state:
                continue
            step = int(state["step"])
            plan = opt._work_plan(p, group)  # fsdp="local": the shard's blocks; of a split parameter, this rank's
            for b, block in enumerate(plan.blocks, plan.first):
                for a in block.axes:
                    info = RootInfo.from_tensor(state.get(info_key(b, a)))
                    attempted = info_key(b, a) in state
                    installed = int(info.installed_step) if info.installed_step >= 0 else None
                    rows.append(dict(
                        param=index, block=b, axis=a, dim=block.shape[a], step=step,
                        has_root=any(k(b, a) in state for k in (root_key, basis_key, diag_key)), root_step=installed,
                        staleness=None if installed is None else step - installed,
                        last_attempt_step=int(info.last_attempt_step) if attempted else None,
                        residual=info.residual if attempted and info.residual >= 0 else None,
                        lambda_max=info.lambda_max if attempted else None, eps=info.eps if attempted else None,
                        rejected=int(info.rejected), method=state.get(method_key(b, a)),
                    ))  # fmt: skip
    return {"global_step": opt.global_step, "skipped_steps": opt.skipped_steps, "blocks": rows}


_KINDS = {"stat.": "statistics", "root.": "roots", "basis.": "basis", "packed.": "packed", "root_diag.": "roots",
          "exp_avg_sq": "second_moment", "exp_avg": "first_moment", "graft_acc": "grafting",
          "momentum_buffer": "momentum"}  # fmt: skip


def memory(opt: Shampoo) -> dict[str, int]:
    """Bytes of optimizer state by kind, and the parameters' bytes, counting each storage once
    (batched statistics and roots live in per-bucket stacks that the state entries view).

    Every tensor the optimizer keeps between steps is counted: the state entries, the whole
    stacks (a roots stack exists before its first root), the engine's masks (``other``) and
    scratch buffers, and the scheduler's snapshots and roots not installed yet
    (``pending_roots``). Not counted: tensors that live only inside a step, and a background
    worker's working memory while it computes."""
    out = dict.fromkeys([*_KINDS.values(), "other", "pending_roots", "scratch", "parameters"], 0)
    seen: set[int] = set()

    def add(kind: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            out[kind] += storage.nbytes()

    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                add(next((kind for prefix, kind in _KINDS.items() if key.startswith(prefix)), "other"), value)
    for kind, stack in opt._buckets.stacks():  # the whole stacks (a roots stack before its first root too)
        add(kind, stack)
    for scratch in opt._buckets.scratch():
        add("scratch", scratch)
    held = getattr(opt.scheduler, "tensors", None)  # a scheduler of the library's; others may hold none
    for t in held() if callable(held) else []:
        add("pending_roots", t)
    out["parameters"] = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return out
