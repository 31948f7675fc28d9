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
``root_info.{b}.{a}``       a :class:`RootInfo` as a float64 CPU tensor ``[last attempt's``
                            ``step, residual or -1, λ_max, ε_eff, rejected so far,``
                            ``step of the installed root or -1]``: finite always
``root_method.{b}.{a}``     the fallback stage of the installed root, e.g. ``"eigh/fp32"``
==========================  ===================================================

With ``Shampoo(batched=True)`` (the default) the ``stat.*`` and ``root.*`` tensors
are views of per-bucket stacks ``[B, n, n]`` (``buckets.py``): ``torch.save`` stores
each stack once, a loaded tensor gets its own storage, and the optimizer re-stacks
them at its next step. The layout of a checkpoint does not depend on ``batched``.

The top-level entry ``"scalable_shampoo"`` holds ``format_version``,
``global_step``, ``skipped_steps`` and the scheduler's pending results.
Format 2 plans parameters by fan-in grouping (``blocks.py``). A format-1 checkpoint
(dims merged from the left) loads only where a parameter's plan is the same under
both rules; any other parameter is refused by name (its statistics can't be converted).

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

if TYPE_CHECKING:
    from .optimizer import Shampoo

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "TOP_KEY",
    "RootInfo",
    "StateCodec",
    "atomic_save",
    "diagnostics",
    "info_key",
    "method_key",
    "root_key",
    "stat_key",
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


def info_key(block: int, axis: int) -> str:  # its RootInfo, as a float64 CPU tensor
    return f"root_info.{block}.{axis}"


def method_key(block: int, axis: int) -> str:  # the fallback stage of its installed root
    return f"root_method.{block}.{axis}"


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

            sd["state"] = {k: v for part in opt._sharding.gather_objects(sd["state"]) for k, v in part.items()}
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
        # FORMATS[version] names what this checkpoint lacks; each gap is filled or checked
        # here, before anything changes (format 1, today's, lacks nothing)
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
        ):
            raise ValueError("state_dict has different param groups than this optimizer")
        # a setting written before it existed gets its default (Shampoo.group_defaults); the
        # groups are checked here, before anything changes, as the constructor checks them
        defaults = opt.group_defaults()
        saved_groups = [{**defaults, **s} for s in saved_groups]
        for s, g in zip(saved_groups, opt.param_groups):
            try:
                opt._validate({**s, "params": g["params"]})
            except ValueError as exc:
                raise ValueError(f"state_dict has a bad param group setting: {exc}") from None
        sd["param_groups"] = saved_groups  # torch copied sd before this hook: the caller's dict is untouched
        params = chain.from_iterable(g["params"] for g in opt.param_groups)
        saved = list(chain.from_iterable(zip(s["params"], [s] * len(s["params"])) for s in saved_groups))
        for (pid, group), p in zip(saved, params):
            state = sd["state"].get(pid, {})
            plan = opt.plan(p, {**group, "params": [p]})
            if "fan-in plans" in FORMATS[version] and state:
                _check_format1_plan(pid, p, group, plan)
            expected = {stat_key(b, a): (blk.shape[a],) * 2 for b, blk in enumerate(plan.blocks) for a in blk.axes}
            expected |= {k: tuple(p.shape) for k in ("exp_avg", "graft_acc", "momentum_buffer")}
            missing = [k for k in expected if k.startswith("stat.") and k not in state]
            if state and ("step" not in state or missing):
                raise ValueError(
                    f"state_dict is missing {'step' if 'step' not in state else missing[0]!r} "
                    f"for parameter {pid} of shape {tuple(p.shape)}"
                )
            for k, v in state.items():
                if torch.is_tensor(v) and (k in expected or k.startswith("stat.")):
                    if tuple(v.shape) != expected.get(k):
                        raise ValueError(
                            f"state_dict does not fit parameter {pid} of shape {tuple(p.shape)}: "
                            f"{k} has shape {tuple(v.shape)}, expected {expected.get(k)}"
                        )
        opt.__dict__["_loaded"] = (sd, meta)  # handed to _restore, which pops it

    @staticmethod
    def _restore(opt: Shampoo) -> None:
        sd, meta = opt.__dict__.pop("_loaded")
        saved_ids = chain.from_iterable(g["params"] for g in sd["param_groups"])
        params = chain.from_iterable(g["params"] for g in opt.param_groups)
        owners, rank = opt.owners(), opt._sharding.rank if opt._sharding is not None else 0
        for index, (pid, p) in enumerate(zip(saved_ids, params)):
            if owners[index] != rank:  # under sharding, another rank's parameter: keep nothing of it
                opt.state.pop(p, None)
                continue
            if pid not in sd["state"]:
                continue
            opt.state[p] = {
                k: v.to(device="cpu" if _on_cpu(k) else p.device, copy=True) if torch.is_tensor(v) else v
                for k, v in sd["state"][pid].items()
            }
            if not torch.is_tensor(opt.state[p]["step"]):  # a plain number, as torch.optim also accepts
                opt.state[p]["step"] = torch.tensor(int(opt.state[p]["step"]), dtype=torch.int64)
            _upgrade_root_info(opt.state[p])
        opt.global_step = int(meta["global_step"])
        opt.skipped_steps = int(meta["skipped_steps"])
        scheduler = meta["scheduler"]
        if opt._sharding is not None:
            from .distributed import filter_pending

            scheduler = filter_pending(scheduler, {i for i, o in enumerate(owners) if o == rank})
        opt.scheduler.load_state_dict(scheduler)



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
            for b, block in enumerate(opt._work_plan(p, group).blocks):  # fsdp="local": the shard's blocks
                for a in block.axes:
                    info = RootInfo.from_tensor(state.get(info_key(b, a)))
                    attempted = info_key(b, a) in state
                    installed = int(info.installed_step) if info.installed_step >= 0 else None
                    rows.append(dict(
                        param=index, block=b, axis=a, dim=block.shape[a], step=step,
                        has_root=root_key(b, a) in state, root_step=installed,
                        staleness=None if installed is None else step - installed,
                        last_attempt_step=int(info.last_attempt_step) if attempted else None,
                        residual=info.residual if attempted and info.residual >= 0 else None,
                        lambda_max=info.lambda_max if attempted else None, eps=info.eps if attempted else None,
                        rejected=int(info.rejected), method=state.get(method_key(b, a)),
                    ))  # fmt: skip
    return {"global_step": opt.global_step, "skipped_steps": opt.skipped_steps, "blocks": rows}


_KINDS = {"stat.": "statistics", "root.": "roots", "exp_avg": "first_moment", "graft_acc": "grafting",
          "momentum_buffer": "momentum"}  # fmt: skip


def memory(opt: Shampoo) -> dict[str, int]:
    """Bytes of optimizer state by kind, and the parameters' bytes, counting each storage once
    (batched statistics and roots live in per-bucket stacks that the state entries view)."""
    out = dict.fromkeys([*_KINDS.values(), "other", "scratch", "parameters"], 0)
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
    for scratch in opt._buckets.scratch():
        add("scratch", scratch)
    out["parameters"] = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return out
