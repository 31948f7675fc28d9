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
``root_info.{b}.{a}``       float64 CPU ``[last attempt's step, residual, λ_max, ε_eff,``
                            ``rejected so far, step of the installed root or -1]``
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

``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the
parameter's dtype (pytorch#43706), which would truncate fp32 statistics under
bf16 parameters. The hooks here put back each tensor exactly as it was saved.
"""

from __future__ import annotations

import os
import tempfile
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .optimizer import Shampoo

__all__ = ["FORMAT_VERSION", "TOP_KEY", "StateCodec", "atomic_save", "diagnostics"]

FORMAT_VERSION = 2  # 2: fan-in grouping (blocks.py); format 1 merged dims from the left
TOP_KEY = "scalable_shampoo"


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
        sd[TOP_KEY] = {
            "format_version": FORMAT_VERSION,
            "global_step": opt.global_step,
            "skipped_steps": opt.skipped_steps,
            "scheduler": opt.scheduler.state_dict(),
        }
        return sd

    @staticmethod
    def _check_and_keep(opt: Shampoo, sd: dict[str, Any]) -> None:
        meta = sd.get(TOP_KEY)
        if not isinstance(meta, dict):
            raise ValueError(f"state_dict has no {TOP_KEY!r} entry: it was not saved by scalable_shampoo.Shampoo")
        version = meta.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"state_dict format_version must be 1 or {FORMAT_VERSION}, got {version!r}")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
        ):
            raise ValueError("state_dict has different param groups than this optimizer")
        params = chain.from_iterable(g["params"] for g in opt.param_groups)
        saved = list(chain.from_iterable(zip(s["params"], [s] * len(s["params"])) for s in saved_groups))
        for (pid, group), p in zip(saved, params):
            state = sd["state"].get(pid, {})
            plan = opt.plan(p, {**group, "params": [p]})
            if version == 1 and state:
                _check_format1_plan(pid, p, group, plan)
            expected = {f"stat.{b}.{a}": (blk.shape[a],) * 2 for b, blk in enumerate(plan.blocks) for a in blk.axes}
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
        for pid, p in zip(saved_ids, params):
            if pid not in sd["state"]:
                continue
            opt.state[p] = {
                k: v.to(device="cpu" if _on_cpu(k) else p.device, copy=True) if torch.is_tensor(v) else v
                for k, v in sd["state"][pid].items()
            }
        opt.global_step = int(meta["global_step"])
        opt.skipped_steps = int(meta["skipped_steps"])
        opt.scheduler.load_state_dict(meta["scheduler"])


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
            for b, block in enumerate(opt.plan(p, group).blocks):
                for a in block.axes:
                    row: dict[str, Any] = dict(
                        param=index, block=b, axis=a, dim=block.shape[a], step=step,
                        has_root=f"root.{b}.{a}" in state, root_step=None, staleness=None,
                        last_attempt_step=None, residual=None, lambda_max=None, eps=None, rejected=0,
                        method=state.get(f"root_method.{b}.{a}"),
                    )  # fmt: skip
                    info = state.get(f"root_info.{b}.{a}")
                    if info is not None:
                        last, residual, lam, eps, rejected, installed = info.tolist()
                        row.update(
                            last_attempt_step=int(last), residual=residual, lambda_max=lam, eps=eps,
                            rejected=int(rejected),
                        )  # fmt: skip
                        if installed >= 0:
                            row.update(root_step=int(installed), staleness=step - int(installed))
                    rows.append(row)
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
