"""Shampoo's optimizer-step time against AdamW, the cost of one root, and the FLOP bound.

Models (``--models``; ``--quick`` shrinks every one to tiny sizes):

- ``linear4``: 4 × ``nn.Linear(1024, 1024)``;
- ``chargpt``: ``CharGPT(vocab=65, ctx=128, d=128, layers=4, heads=4)`` from ``scalable_shampoo_bench/models.py``;
- ``transformer``: ``nn.TransformerEncoder``, d=512, 4 layers, 8 heads, feed-forward 2048;
- ``resnet``: ``ResNet()`` from ``scalable_shampoo_bench/models.py`` (widths 16, 32, 64; 1×28×28 images);
- ``cnn``: a ResNet for 3×32×32 images (CIFAR-sized): widths 32, 64, 128, two BasicBlocks
  each, 0.69M parameters, almost all of them in 3×3 conv kernels;
- ``embedding``: ``nn.Embedding(100_000, 64)``, the mean over each bag, then an MLP 64-256-1
  (the table's 100k axis is above ``max_preconditioner_dim``: it is preconditioned on its
  64-axis only, as one block).

Five measurements, all in one run and on one machine, written to one JSON file:

1. **Step time** (``step_time``): the optimizer step alone, on fixed random
   gradients (``p.grad`` is set once from a seeded generator and re-used), for
   Shampoo and ``torch.optim.AdamW(foreach=True)`` on two copies of the same model,
   per model × ``--block-sizes`` (256, 1024) × ``--frequencies`` (10, 100).
   The two are interleaved in chunks (A B B A A B …) over ``--periods`` full
   ``precondition_frequency`` periods, so root recomputation is inside the window
   exactly ``--periods`` times. Median, mean (amortized) and max step; the max is
   the root spike. Each record has the number of preconditioned blocks.
2. **End to end** (``end_to_end``): forward + backward + step of each model on a
   fixed batch of its own, Shampoo against AdamW, interleaved the same way:
   linear4 512 random rows and transformer 8 × 64 random tokens (MSE to random
   targets), chargpt 32 × 128 token ids (next-token cross-entropy), resnet 128
   images (cross-entropy), embedding 256 bags of 16 row ids (BCE with logits).
3. **Roots** (``roots``): one inverse 4th root by eigh and by coupled Newton at
   several sizes, through ``inverse_root`` (which adds λ_max, the residual check
   and retries) and through the raw ``eigh_inverse_root`` /
   ``coupled_newton_inverse_root``; median of repeats, methods interleaved.
4. **FLOP bound** (``flop_bound``): the matmul FLOPs of one step's statistics
   (``G Gᵀ``, ``Gᵀ G``) and preconditioning (``L^(-1/p) G R^(-1/p)``), divided by
   the GEMM rate measured in the same run (a 1024×1024 fp32 matmul), per step_time record.
5. **Batched against plain** (``batched``, with ``--batched-compare``): per model and
   block size, the Shampoo step alone with ``batched=True`` (equal blocks stacked,
   batched matmuls) against ``batched=False`` (the per-block loop), interleaved, over
   ``--batched-steps`` steps with no root recomputation inside the window; the ratio
   plain/batched and the number of preconditioned blocks (``plan.blocks`` with axes,
   over the parameters). ``batched_summary`` names the record with the most blocks
   and whether plain/batched reaches the goal of 3× there.

The thread count is set explicitly (``--threads``) and recorded, with the torch
version, the device, and the CPU time that other processes used during each
measurement (from ``/proc/stat`` deltas minus this process's own CPU time; null
where ``/proc/stat`` does not exist). See the project's benchmarking notes (BENCHMARKS.md) for why.

Run ``python -m scalable_shampoo_bench.step_time --help``; ``--quick`` is a smoke test of a few seconds.
The whole benchmark, every model, with the batched comparison::

    python -m scalable_shampoo_bench.step_time --threads 1 --batched-compare --out step_time.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from scalable_shampoo import Shampoo
from scalable_shampoo.blocks import BlockPlan, make_plan
from scalable_shampoo.matrix_roots import (
    coupled_newton_inverse_root,
    eigh_inverse_root,
    inverse_root,
    max_eigenvalue,
    root_residual,
)

from .models import CharGPT, ResNet

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux
    resource = None  # type: ignore[assignment]

__all__ = ["main"]

MODELS = ("linear4", "chargpt", "transformer", "resnet", "cnn", "embedding")
ROOT_P = 4


# ---------------------------------------------------------------------------------------------- machine load
def _proc_stat() -> tuple[int, int, int, int] | None:
    """(total, idle + iowait, steal, number of cpuN lines) in jiffies, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    fields += [0] * (8 - len(fields))
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return total, fields[3] + fields[4], fields[7], ncpu


def _own_cpu_s() -> float:
    if resource is not None:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return r.ru_utime + r.ru_stime
    return time.process_time()


class CpuLoad:
    """CPU use of the whole machine and of other processes between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._t = time.perf_counter()
        self._stat = _proc_stat()
        self._own = _own_cpu_s()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t
        own = _own_cpu_s() - self._own
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "own_cpu_s": round(own, 3),
            "own_cores": round(own / wall, 3) if wall > 0 else None,
            "machine_cpus": None,
            "machine_busy_fraction": None,
            "other_busy_fraction": None,
            "other_cores": None,
            "steal_fraction": None,
        }
        end = _proc_stat()
        if self._stat is None or end is None:
            return out
        hz = os.sysconf("SC_CLK_TCK")
        total = (end[0] - self._stat[0]) / hz
        idle = (end[1] - self._stat[1]) / hz
        steal = (end[2] - self._stat[2]) / hz
        if total <= 0:
            return out
        busy = total - idle - steal
        other = max(0.0, busy - own)
        out.update(
            machine_cpus=end[3],
            machine_busy_fraction=round(busy / total, 4),
            other_busy_fraction=round(other / total, 4),  # share of all CPUs used by other processes
            other_cores=round(other / wall, 3) if wall > 0 else None,  # cores' worth used by others
            steal_fraction=round(steal / total, 4),  # taken by the hypervisor
        )
        return out


@contextmanager
def measured_load(record: dict[str, Any]) -> Iterator[None]:
    load = CpuLoad()
    try:
        yield
    finally:
        record["load"] = load.stop()


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def interleave(
    run_a: Callable[[], object], run_b: Callable[[], object], n: int, chunk: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """``n`` timed calls of each, in chunks A B B A A B …; the seconds of every call, in order."""
    ta: list[float] = []
    tb: list[float] = []
    done, i = 0, 0
    while done < n:
        k = min(chunk, n - done)
        order = [(run_a, ta), (run_b, tb)] if i % 2 == 0 else [(run_b, tb), (run_a, ta)]
        for fn, out in order:
            for _ in range(k):
                out.append(_timed(fn, device))
        done, i = done + k, i + 1
    return ta, tb


def _ms(x: float) -> float:
    return round(1e3 * x, 4)


def summarize(times: Sequence[float], spikes: Sequence[bool] | None = None) -> dict[str, Any]:
    """Median / mean / max in ms; with ``spikes`` (root steps), also the root and non-root medians."""
    s = sorted(times)
    out: dict[str, Any] = {
        "steps": len(times),
        "median_ms": _ms(statistics.median(s)),
        "mean_ms": _ms(statistics.fmean(s)),
        "max_ms": _ms(s[-1]),
        "min_ms": _ms(s[0]),
        "p90_ms": _ms(s[min(len(s) - 1, int(0.9 * len(s)))]),
        "total_s": round(sum(s), 4),
    }
    if spikes is not None:
        root = [t for t, r in zip(times, spikes, strict=True) if r]
        rest = [t for t, r in zip(times, spikes, strict=True) if not r]
        out["root_steps"] = len(root)
        out["root_step_median_ms"] = _ms(statistics.median(root)) if root else None
        out["nonroot_median_ms"] = _ms(statistics.median(rest)) if rest else None
        out["nonroot_mean_ms"] = _ms(statistics.fmean(rest)) if rest else None
    return out


def _ratio_dict(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: round(a[f"{k}_ms"] / b[f"{k}_ms"], 3) for k in ("median", "mean", "max")}


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {f"ratio_{k}": v for k, v in _ratio_dict(a, b).items()}


# ---------------------------------------------------------------------------------------------- models
class EmbeddingMLP(nn.Module):
    """An embedding table (``rows × d``), the mean over each bag of indices, then a ``d-hidden-1`` MLP."""

    def __init__(self, rows: int, d: int, hidden: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, idx: Tensor) -> Tensor:  # idx: (batch, bag) → one logit per row
        return self.mlp(self.table(idx).mean(dim=1)).squeeze(1)


def model_dims(name: str, quick: bool) -> dict[str, Any]:
    """The model's sizes; ``quick``: tiny ones, for the smoke test."""
    if name == "linear4":
        return {"d": 64 if quick else 1024, "layers": 4}
    if name == "chargpt":  # vocab ~ Shakespeare's characters
        if quick:
            return {"vocab": 11, "ctx": 8, "d": 16, "layers": 1, "heads": 2}
        return {"vocab": 65, "ctx": 128, "d": 128, "layers": 4, "heads": 4}
    if name == "transformer":
        if quick:
            return {"d": 32, "layers": 1, "heads": 2, "ff": 64}
        return {"d": 512, "layers": 4, "heads": 8, "ff": 2048}
    if name == "resnet":  # 1×28×28 images, as Fashion-MNIST
        if quick:
            return {"widths": [4, 8], "classes": 3, "image": 8}
        return {"widths": [16, 32, 64], "classes": 10, "image": 28}
    if name == "cnn":  # 3×32×32 images, as CIFAR-10
        if quick:
            return {"widths": [4, 8], "classes": 3, "image": 8, "channels": 3, "depth": 2}
        return {"widths": [32, 64, 128], "classes": 10, "image": 32, "channels": 3, "depth": 2}
    if name == "embedding":  # quick: still more rows than max_preconditioner_dim (4096), so one-sided as in full
        if quick:
            return {"rows": 5000, "d": 8, "hidden": 16}
        return {"rows": 100_000, "d": 64, "hidden": 256}
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_model(name: str, quick: bool, device: torch.device, seed: int = 0) -> nn.Module:
    dims = model_dims(name, quick)
    torch.manual_seed(seed)
    model: nn.Module
    if name == "linear4":
        model = nn.Sequential(*[nn.Linear(dims["d"], dims["d"]) for _ in range(dims["layers"])])
    elif name == "chargpt":
        model = CharGPT(dims["vocab"], dims["ctx"], d=dims["d"], layers=dims["layers"], heads=dims["heads"])
    elif name == "transformer":
        layer = nn.TransformerEncoderLayer(
            dims["d"], dims["heads"], dims["ff"], dropout=0.0, batch_first=True
        )
        model = nn.TransformerEncoder(layer, dims["layers"], enable_nested_tensor=False)
    elif name == "resnet":
        model = ResNet(tuple(dims["widths"]), classes=dims["classes"])
    elif name == "cnn":
        widths = tuple(dims["widths"])
        model = ResNet(widths, classes=dims["classes"], in_channels=dims["channels"], depth=dims["depth"])
    else:
        model = EmbeddingMLP(dims["rows"], dims["d"], dims["hidden"])
    return model.to(device)


def e2e_shape(name: str, quick: bool, args: argparse.Namespace | None = None) -> dict[str, int]:
    """The end-to-end batch of each model; ``--e2e-batch`` / ``--e2e-seq`` override the batch / sequence length."""
    shape: dict[str, int] = {
        "linear4": {"batch": 8} if quick else {"batch": 512},  # rows of d features
        "chargpt": {"batch": 2, "seq": 8} if quick else {"batch": 32, "seq": 128},
        "transformer": {"batch": 2, "seq": 8} if quick else {"batch": 8, "seq": 64},
        "resnet": {"batch": 4} if quick else {"batch": 128},
        "cnn": {"batch": 4} if quick else {"batch": 128},
        "embedding": {"batch": 8, "bag": 4} if quick else {"batch": 256, "bag": 16},
    }[name]
    if args is not None:
        if args.e2e_batch is not None:
            shape["batch"] = args.e2e_batch
        if args.e2e_seq is not None and "seq" in shape:
            shape["seq"] = args.e2e_seq
    return shape


def e2e_loss(
    name: str, dims: dict[str, Any], shape: dict[str, int], device: torch.device, seed: int = 2
) -> Callable[[nn.Module], Tensor]:
    """A fixed batch for ``name`` and the loss of a model on it.

    linear4 and transformer: random float inputs, MSE to random targets; chargpt: token
    ids, next-token cross-entropy; resnet: 1×H×W images, cross-entropy over the classes;
    embedding: bags of uniform random row ids, BCE with logits to random 0/1 labels.
    """
    gen = torch.Generator().manual_seed(seed)
    b = shape["batch"]
    if name in ("linear4", "transformer"):
        size = (b, dims["d"]) if name == "linear4" else (b, shape["seq"], dims["d"])
        x = torch.randn(size, generator=gen).to(device)
        y = torch.randn(size, generator=gen).to(device)
        return lambda model: F.mse_loss(model(x), y)
    if name == "chargpt":
        tokens = torch.randint(dims["vocab"], (b, shape["seq"] + 1), generator=gen).to(device)
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        return lambda model: F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    if name in ("resnet", "cnn"):
        x = torch.randn(b, dims.get("channels", 1), dims["image"], dims["image"], generator=gen).to(device)
        y = torch.randint(dims["classes"], (b,), generator=gen).to(device)
        return lambda model: F.cross_entropy(model(x), y)
    if name == "embedding":
        idx = torch.randint(dims["rows"], (b, shape["bag"]), generator=gen).to(device)
        y = torch.randint(2, (b,), generator=gen).float().to(device)
        return lambda model: F.binary_cross_entropy_with_logits(model(idx), y)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def set_fixed_grads(model: nn.Module, seed: int) -> None:
    """``p.grad`` from a seeded generator, the same for every copy of the model; set once, re-used."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device=p.device, dtype=p.dtype)


def shampoo_options(args: argparse.Namespace) -> dict[str, Any]:
    """Shampoo options beyond the defaults, from ``--compile-elementwise`` and ``--bf16-roots``."""
    out: dict[str, Any] = {}
    if getattr(args, "compile_elementwise", False):
        out["compile_elementwise"] = True
    if getattr(args, "bf16_roots", False):
        out["root_storage_dtype"] = torch.bfloat16
    if getattr(args, "format1_merge", False):
        out["format1_merge"] = True
    return out


class Format1MergeShampoo(Shampoo):
    """Shampoo planned with format 1's merge rule (dims merged from the left), to time
    what fan-in grouping changed; every stage of the step takes its plan from ``plan``."""

    @staticmethod
    def plan(p: Tensor, group: dict[str, Any]) -> BlockPlan:
        bound = group["merge_dims_bound"] or group["block_size"]
        return make_plan(
            tuple(p.shape), group["block_size"], group["max_preconditioner_dim"], bound, group["precondition_1d"],
            None, "left",
        )  # fmt: skip


def make_shampoo(
    model: nn.Module, block_size: int, frequency: int, start: int, batched: bool = True, **options: Any
) -> Shampoo:
    cls = Format1MergeShampoo if options.pop("format1_merge", False) else Shampoo
    return cls(
        model.parameters(),
        lr=1e-3,
        weight_decay=1e-2,
        block_size=block_size,
        precondition_frequency=frequency,
        start_preconditioning_step=start,
        batched=batched,
        **options,
    )


def make_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)


def root_counts(opt: Shampoo) -> dict[str, int]:
    """Roots installed and rejected so far, from the optimizer's state."""
    installed = rejected = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key.startswith("root."):
                installed += 1
            elif key.startswith("root_info."):
                rejected += int(value[4])
    return {"root_matrices": installed, "roots_rejected": rejected}


def block_counts(model: nn.Module, opt: Shampoo) -> dict[str, int]:
    """Blocks of the model under ``opt``'s plans: preconditioned ones (with a statistic), all, distinct shapes."""
    group = opt.param_groups[0]
    blocks = [b for p in model.parameters() for b in opt.plan(p, group).blocks]
    pre = [b for b in blocks if b.axes]
    return {
        "blocks": len(pre),
        "blocks_total": len(blocks),
        "block_shapes": len({(b.shape, b.axes) for b in pre}),
    }


def step_flops(model: nn.Module, opt: Shampoo) -> float:
    """Matmul FLOPs of one step's statistics and preconditioning, over every preconditioned block.

    A block with ``N`` entries and a statistic on axis ``a`` (length ``n_a``) costs
    ``2·N·n_a`` for ``G₍ₐ₎G₍ₐ₎ᵀ`` and ``2·N·n_a`` for contracting G with the root:
    ``4·N·Σₐ n_a`` (for an m×n matrix, ``4mn(m + n)``).
    """
    group = opt.param_groups[0]
    flops = 0.0
    for p in model.parameters():
        for block in opt.plan(p, group).blocks:
            numel = 1
            for n in block.shape:
                numel *= n
            flops += 4.0 * numel * sum(block.shape[a] for a in block.axes)
    return flops


def _is_root_step(step: int, start: int, frequency: int) -> bool:
    return step >= start and (step - start) % frequency == 0


# ---------------------------------------------------------------------------------------------- 1. step time
def bench_step_time(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    set_fixed_grads(model_a, seed=1)
    set_fixed_grads(model_b, seed=1)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step, **shampoo_options(args))
    adamw = make_adamw(model_b)
    n = args.periods * frequency
    warmup = args.warmup
    record: dict[str, Any] = {
        "model": name,
        "dims": model_dims(name, args.quick),
        "params": sum(p.numel() for p in model_a.parameters()),
        "block_size": block_size,
        "precondition_frequency": frequency,
        "start_preconditioning_step": args.start_step,
        "warmup_steps": warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    with measured_load(record):
        for _ in range(warmup):  # untimed: state allocation, the first roots
            shampoo.step()
            adamw.step()
        first = shampoo.global_step + 1
        ta, tb = interleave(shampoo.step, adamw.step, n, args.chunk, device)
    spikes = [_is_root_step(s, args.start_step, frequency) for s in range(first, first + n)]
    record["shampoo"] = summarize(ta, spikes)
    record["adamw"] = summarize(tb)
    record.update(_ratios(record["shampoo"], record["adamw"]))
    record.update(root_counts(shampoo))
    record.update(block_counts(model_a, shampoo))
    record["step_gflop"] = round(step_flops(model_a, shampoo) / 1e9, 4)
    record["raw_ms"] = {"shampoo": [_ms(t) for t in ta], "adamw": [_ms(t) for t in tb], "first_shampoo_step": first}
    if args.profile:
        record["profile"] = profile_steps(shampoo, device, args.profile_steps, args.start_step, frequency)
    return record


def _top_ops(prof: Any, steps: int, top: int = 12) -> dict[str, Any]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    steps = max(steps, 1)
    rows = [
        {
            "op": e.key,
            "calls_per_step": round(e.count / steps, 2),
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "self_share": round(e.self_cpu_time_total / total_self, 4),
        }
        for e in events[:top]
    ]
    return {
        "steps": steps,
        "self_ms_per_step_total": round(total_self / 1e3 / steps, 3),
        "ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "top_ops": rows,
    }


def profile_steps(
    opt: Shampoo, device: torch.device, steps: int, start: int, frequency: int, root_step: bool = True
) -> dict[str, Any]:
    """The top ops by self time over ``steps`` non-root Shampoo steps, then over one root step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    while _is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    done = 0
    with profile(activities=activities) as prof:
        while done < steps and not _is_root_step(opt.global_step + 1, start, frequency):
            opt.step()
            done += 1
    _sync(device)
    out = _top_ops(prof, done)
    if not root_step:
        return out
    while not _is_root_step(opt.global_step + 1, start, frequency):
        opt.step()
    with profile(activities=activities) as prof:
        opt.step()
    _sync(device)
    out["root_step"] = _top_ops(prof, 1)
    return out


# ---------------------------------------------------------------------------------------------- 2. end to end
def bench_end_to_end(
    name: str, block_size: int, frequency: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    dims = model_dims(name, args.quick)
    shape = e2e_shape(name, args.quick, args)
    loss_of = e2e_loss(name, dims, shape, device)
    shampoo = make_shampoo(model_a, block_size, frequency, args.start_step, **shampoo_options(args))
    adamw = make_adamw(model_b)

    def iteration(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()

        return run

    run_a, run_b = iteration(model_a, shampoo), iteration(model_b, adamw)
    n = args.periods * frequency
    record: dict[str, Any] = {
        "model": name,
        "dims": dims,
        "batch": shape,
        "block_size": block_size,
        "precondition_frequency": frequency,
        "start_preconditioning_step": args.start_step,
        "warmup_steps": args.warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    with measured_load(record):
        for _ in range(args.warmup):
            run_a()
            run_b()
        first = shampoo.global_step + 1
        ta, tb = interleave(run_a, run_b, n, args.chunk, device)
    spikes = [_is_root_step(s, args.start_step, frequency) for s in range(first, first + n)]
    record["shampoo"] = summarize(ta, spikes)
    record["adamw"] = summarize(tb)
    record.update(_ratios(record["shampoo"], record["adamw"]))
    record.update(root_counts(shampoo))
    record.update(block_counts(model_a, shampoo))
    record["raw_ms"] = {"shampoo": [_ms(t) for t in ta], "adamw": [_ms(t) for t in tb], "first_shampoo_step": first}
    return record


# ---------------------------------------------------------------------------------------------- 5. batched vs plain
# two Shampoo variants timed against each other: (label, options) of the fast one, then of the reference
PAIRS: dict[str, tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]] = {
    "batched": (("batched", {"batched": True}), ("plain", {"batched": False})),
    "compile": (("compiled", {"compile_elementwise": True}), ("eager", {"compile_elementwise": False})),
}


def bench_batched(
    name: str, block_size: int, args: argparse.Namespace, device: torch.device, pair: str = "batched"
) -> dict[str, Any]:
    """Shampoo ``batched=True`` against ``batched=False`` (the plain per-block loop): the step alone, interleaved.

    ``pair="compile"``: ``compile_elementwise=True`` against the eager ``torch._foreach_*`` path instead.

    Fixed gradients, as in ``bench_step_time``. Roots are computed at the first
    (untimed) step and, with ``precondition_frequency = warmup + steps``, not again
    inside the window: the comparison is of the per-step work, which is what
    batching changes (the roots are the same eigh calls either way).
    """
    model_a = make_model(name, args.quick, device)
    model_b = copy.deepcopy(model_a)
    set_fixed_grads(model_a, seed=1)
    set_fixed_grads(model_b, seed=1)
    n, warmup, start = args.batched_steps, args.warmup, 1
    frequency = warmup + n  # roots at step 1, next at step warmup + n + 1: after the window
    (label_a, opts_a), (label_b, opts_b) = PAIRS[pair]
    batched = make_shampoo(model_a, block_size, frequency, start, **{**shampoo_options(args), **opts_a})
    plain = make_shampoo(model_b, block_size, frequency, start, **{**shampoo_options(args), **opts_b})
    record: dict[str, Any] = {
        "pair": pair,
        "model": name,
        "dims": model_dims(name, args.quick),
        "params": sum(p.numel() for p in model_a.parameters()),
        "block_size": block_size,
        **block_counts(model_a, batched),
        "precondition_frequency": frequency,
        "start_preconditioning_step": start,
        "warmup_steps": warmup,
        "measured_steps": n,
        "chunk": args.chunk,
    }
    with measured_load(record):
        for _ in range(warmup):  # untimed: state allocation, stacking, the roots
            batched.step()
            plain.step()
        first = batched.global_step + 1
        ta, tb = interleave(batched.step, plain.step, n, args.chunk, device)
    spikes = [_is_root_step(s, start, frequency) for s in range(first, first + n)]
    record[label_a] = summarize(ta, spikes)
    record[label_b] = summarize(tb, spikes)
    # reference / fast: > 1 when the fast variant is faster
    ratios = _ratio_dict(record[label_b], record[label_a])
    record.update({f"{label_b}_over_{label_a}_{k}": v for k, v in ratios.items()})
    counts = root_counts(batched)
    record["root_matrices"] = counts["root_matrices"]
    record["roots_rejected"] = {label_a: counts["roots_rejected"], label_b: root_counts(plain)["roots_rejected"]}
    with torch.no_grad():  # the two should take the same steps; a large value means they did not
        pairs = zip(model_a.parameters(), model_b.parameters(), strict=True)
        record["max_abs_param_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
    record["raw_ms"] = {label_a: [_ms(t) for t in ta], label_b: [_ms(t) for t in tb], "first_step": first}
    record["step_gflop"] = round(step_flops(model_a, batched) / 1e9, 4)  # the matmuls either variant must do
    if args.profile:  # where each variant's time goes (non-root steps)
        record["profile"] = {
            label: profile_steps(opt, device, args.profile_steps, start, frequency, root_step=False)
            for label, opt in ((label_a, batched), (label_b, plain))
        }
    return record


def batched_summary(records: list[dict[str, Any]], goal: float = 3.0) -> dict[str, Any]:
    """Blocks per model and block size, and the plain/batched ratio on the record with the most blocks."""
    top = max(records, key=lambda r: r["blocks"])
    blocks: dict[str, dict[str, int]] = {}
    for r in records:
        blocks.setdefault(r["model"], {})[str(r["block_size"])] = r["blocks"]
    return {
        "blocks": blocks,
        "most_blocks": {
            "model": top["model"],
            "block_size": top["block_size"],
            "blocks": top["blocks"],
            "plain_over_batched_median": top["plain_over_batched_median"],
            "plain_over_batched_mean": top["plain_over_batched_mean"],
        },
        "goal_plain_over_batched": goal,
        "goal_met": top["plain_over_batched_median"] >= goal,
    }


# ---------------------------------------------------------------------------------------------- 3. roots
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
                        times[k].append(_timed(fn, device))
            for k, ts in times.items():
                record[k] = {"median_ms": _ms(statistics.median(ts)), "min_ms": _ms(min(ts)), "repeats": len(ts)}
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


# ---------------------------------------------------------------------------------------------- 4. GEMM rate
def gemm_rate(n: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """GFLOP/s of an n×n fp32 matmul (2n³ FLOPs), median of ``repeats``."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    ts = [_timed(lambda: torch.matmul(a, b, out=out), device) for _ in range(repeats)]
    med = statistics.median(ts)
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "median_ms": _ms(med),
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


# ---------------------------------------------------------------------------------------------- report
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return "-" if x is None else str(x)


def _load_str(load: dict[str, Any]) -> str:
    if load.get("other_cores") is None:
        return "n/a"
    return f"{load['other_cores']:.2f}"


def report(res: dict[str, Any]) -> str:
    m = res["meta"]
    parts = [
        f"torch {m['torch']}  device {m['device']} ({m['device_name']})  threads {m['threads']}  "
        f"cpus {m['cpu_count']}  {'QUICK ' if m['quick'] else ''}wall {m.get('wall_s', 0):.1f}s  "
        f"other processes: {_load_str(res['load'])} cores on average "
        f"(machine busy {res['load'].get('machine_busy_fraction')})"
    ]
    step_headers = [
        "model", "block", "freq", "blocks", "sh med", "sh mean", "sh max", "sh root", "aw med", "aw mean", "aw max",
        "x med", "x mean", "x max", "others",
    ]  # fmt: skip

    def step_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
        return [
            [
                r["model"], r["block_size"], r["precondition_frequency"], r["blocks"],
                r["shampoo"]["median_ms"], r["shampoo"]["mean_ms"], r["shampoo"]["max_ms"],
                r["shampoo"]["root_step_median_ms"], r["adamw"]["median_ms"], r["adamw"]["mean_ms"],
                r["adamw"]["max_ms"], r["ratio_median"], r["ratio_mean"], r["ratio_max"], _load_str(r["load"]),
            ]
            for r in records
        ]  # fmt: skip

    if res.get("step_time"):
        parts += ["", "Optimizer step only (ms; x = Shampoo/AdamW; others = cores used by other processes)"]
        parts.append(_table(step_headers, step_rows(res["step_time"])))
    if res.get("end_to_end"):
        parts += ["", "End to end: forward + backward + step (ms)"]
        parts.append(_table(step_headers, step_rows(res["end_to_end"])))
    if res.get("batched"):
        parts += [
            "",
            "Shampoo step alone, batched=True against batched=False (the per-block loop); no root recomputation "
            "in the window (ms; x = plain/batched)",
        ]
        rows = [
            [
                r["model"], r["block_size"], r["blocks"], r["block_shapes"], r["batched"]["median_ms"],
                r["batched"]["mean_ms"], r["plain"]["median_ms"], r["plain"]["mean_ms"],
                r["plain_over_batched_median"], r["plain_over_batched_mean"], f"{r['max_abs_param_diff']:.1e}",
                _load_str(r["load"]),
            ]
            for r in res["batched"]
        ]  # fmt: skip
        headers = [
            "model", "block", "blocks", "shapes", "batched med", "batched mean", "plain med", "plain mean",
            "x med", "x mean", "param diff", "others",
        ]  # fmt: skip
        parts.append(_table(headers, rows))
        top = res["batched_summary"]["most_blocks"]
        parts.append(
            f"  most blocks: {top['model']} at block {top['block_size']} ({top['blocks']} blocks): "
            f"plain/batched {top['plain_over_batched_median']}x median (goal "
            f"≥ {res['batched_summary']['goal_plain_over_batched']}x: "
            f"{'met' if res['batched_summary']['goal_met'] else 'not met'})"
        )
    if res.get("roots"):
        parts += ["", f"One inverse {ROOT_P}th root, fp32 (median ms; eigh/newton via inverse_root, *_raw bare)"]
        rows = [
            [
                r["spectrum"], r["n"], r["threads"], r["eigh"]["median_ms"], r["newton"]["median_ms"],
                r["newton_over_eigh"], r["eigh_raw"]["median_ms"], r["newton_raw"]["median_ms"],
                r["newton_iterations"], f"{r['condition_number']:.1e}", f"{r['residual_eigh']:.1e}",
                f"{r['residual_newton']:.1e}", _load_str(r["load"]),
            ]
            for r in res["roots"]
        ]  # fmt: skip
        headers = [
            "spectrum", "n", "thr", "eigh", "newton", "newton/eigh", "eigh_raw", "newton_raw", "iters", "cond",
            "res eigh", "res newton", "others",
        ]  # fmt: skip
        parts.append(_table(headers, rows))
    if res.get("gemm"):
        rates = ", ".join(f"n={g['n']}: {g['gflops']}" for g in res["gemm"])
        parts += ["", f"GEMM fp32 GFLOP/s ({res['gemm'][0]['threads']} threads): {rates}"]
    if res.get("flop_bound"):
        parts += ["", "FLOP bound of the Shampoo step (statistics + preconditioning matmuls ÷ GEMM rate)"]
        rows = [
            [
                r["model"], r["block_size"], r["step_gflop"], r["gemm_gflops"], r["bound_ms"],
                r["bound_ms_at_block_gemm"], r["shampoo_nonroot_median_ms"], r["nonroot_median_over_bound"],
                r["shampoo_mean_ms"], r["mean_over_bound"], r["achieved_gflops_nonroot"],
            ]
            for r in res["flop_bound"]
        ]  # fmt: skip
        headers = [
            "model", "block", "GFLOP/step", "GEMM GF/s", "bound ms", "bound@block", "nonroot med", "x bound",
            "mean", "x bound", "achieved GF/s",
        ]  # fmt: skip
        parts.append(_table(headers, rows))
    for r in res.get("step_time", []):
        if "profile" in r:
            prof = r["profile"]
            parts += [
                "",
                f"Profile {r['model']} block {r['block_size']}: {prof['steps']} non-root steps, "
                f"{prof['self_ms_per_step_total']} ms self CPU/step, {prof['ops_per_step']} ops/step",
            ]
            rows = [[o["op"], o["calls_per_step"], o["self_ms_per_step"], o["self_share"]] for o in prof["top_ops"]]
            parts.append(_table(["op", "calls/step", "self ms/step", "share"], rows))
            root = prof["root_step"]
            parts.append(f"  one root step: {root['self_ms_per_step_total']} ms self CPU, top ops:")
            rows = [[o["op"], o["calls_per_step"], o["self_ms_per_step"], o["self_share"]] for o in root["top_ops"][:8]]
            parts.append(_table(["op", "calls", "self ms", "share"], rows))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shampoo-bench step-time",
        description="Shampoo vs AdamW optimizer-step time (interleaved), root cost, FLOP bound.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything but --root-threads")
    p.add_argument("--out", default="step_time.json", help="JSON output file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of a few seconds")
    p.add_argument("--models", type=_names, default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--block-sizes", type=_ints, default=None, help="comma list (default 256,1024)")
    p.add_argument("--frequencies", type=_ints, default=None, help="precondition_frequency list (default 10,100)")
    p.add_argument("--start-step", type=int, default=1, help="start_preconditioning_step (default 1)")
    p.add_argument("--periods", type=int, default=2, help="measured precondition_frequency periods (≥ 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring (default 3)")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved chunk (default 10)")
    p.add_argument("--compile-elementwise", action="store_true", help="Shampoo(compile_elementwise=True)")
    p.add_argument("--bf16-roots", action="store_true", help="Shampoo(root_storage_dtype=torch.bfloat16)")
    p.add_argument(
        "--format1-merge", action="store_true", help="plan Shampoo with the format-1 merge rule (from the left)"
    )
    p.add_argument("--e2e-models", type=_names, default=None, help="end-to-end models (default: all)")
    p.add_argument(
        "--e2e-batch", type=int, default=None,
        help="end-to-end batch for every model (default per model: linear4 512 rows, chargpt 32, transformer 8, "
        "resnet 128, embedding 256 bags)",
    )  # fmt: skip
    p.add_argument(
        "--e2e-seq", type=int, default=None,
        help="end-to-end sequence length of chargpt and transformer (default 128 and 64; chargpt's ctx is 128)",
    )  # fmt: skip
    p.add_argument(
        "--batched-compare", action="store_true",
        help="also time Shampoo batched=True against batched=False (the per-block loop), step alone, "
        "per model and block size (the 'batched' section)",
    )  # fmt: skip
    p.add_argument("--batched-steps", type=int, default=None, help="timed steps each in --batched-compare (default 40)")
    p.add_argument("--root-sizes", type=_ints, default=None, help="root matrix sizes (default 256,512,1024)")
    p.add_argument("--root-spectra", type=_names, default=["square", "tall"], help="square (ill-), tall (well-cond.)")
    p.add_argument("--root-threads", type=_ints, default=None, help="thread counts for root timing (default --threads)")
    p.add_argument("--root-repeats", type=int, default=None, help="repeats per root timing (default 5)")
    p.add_argument("--gemm-sizes", type=_ints, default=None, help="GEMM sizes (default 256,512,1024)")
    p.add_argument(
        "--sections", type=_names, default=["steps", "e2e", "roots", "flops"],
        help="what to run: steps, e2e, roots, flops, batched, compile (default: the first four; "
        "--batched-compare adds batched; compile times compile_elementwise=True against eager)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of non-root Shampoo steps")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "models": list(MODELS),
        "block_sizes": [16, 64] if q else [256, 1024],
        "frequencies": [4] if q else [10, 100],
        "warmup": 2 if q else 3,
        "chunk": 3 if q else 10,
        "e2e_models": list(MODELS),
        "batched_steps": 4 if q else 40,
        "root_sizes": [16, 32] if q else [256, 512, 1024],
        "root_threads": [args.threads],
        "root_repeats": 2 if q else 5,
        "gemm_sizes": [32, 64] if q else [256, 512, 1024],
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.periods < 1 or args.warmup < 1 or args.chunk < 1 or args.batched_steps < 1:
        p.error("--periods, --warmup, --chunk and --batched-steps must be ≥ 1")
    if args.e2e_batch is not None and args.e2e_batch < 1:
        p.error("--e2e-batch must be ≥ 1")
    if args.e2e_seq is not None and not 1 <= args.e2e_seq <= model_dims("chargpt", q)["ctx"]:
        p.error(f"--e2e-seq must be in [1, {model_dims('chargpt', q)['ctx']}] (chargpt's context)")
    if args.batched_compare and "batched" not in args.sections:
        args.sections = [*args.sections, "batched"]
    for m in args.models + args.e2e_models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    unknown = set(args.sections) - {"steps", "e2e", "roots", "flops", "batched", "compile"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {
            "benchmark": "step_time",
            "argv": sys.argv[1:] if argv is None else list(argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "root_threads": args.root_threads,
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
            "mkl": torch.backends.mkl.is_available(),
            "quick": args.quick,
            "source": _source_info(),
            "note": args.note,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        },
    }
    whole = CpuLoad()
    sections = set(args.sections)
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)

    def save(complete: bool = False) -> None:  # after every measurement, so a cut-short run keeps its results
        res["meta"]["complete"] = complete
        out.write_text(json.dumps(res, indent=1) + "\n")

    if "flops" in sections:
        res["gemm"] = [gemm_rate(n, device, 5 if args.quick else 20) for n in args.gemm_sizes]
    if "steps" in sections:
        res["step_time"] = []
        for m in args.models:
            for bs in args.block_sizes:
                for f in args.frequencies:
                    res["step_time"].append(bench_step_time(m, bs, f, args, device))
                    save()
    if "e2e" in sections:
        res["end_to_end"] = []
        for m in args.e2e_models:
            for bs in args.block_sizes:
                for f in args.frequencies:
                    res["end_to_end"].append(bench_end_to_end(m, bs, f, args, device))
                    save()
    if "batched" in sections:
        res["batched"] = []
        for m in args.models:
            for bs in args.block_sizes:
                res["batched"].append(bench_batched(m, bs, args, device))
                save()
        res["batched_summary"] = batched_summary(res["batched"])
    if "compile" in sections:
        res["compile"] = []
        for m in args.models:
            for bs in args.block_sizes:
                res["compile"].append(bench_batched(m, bs, args, device, pair="compile"))
                save()
    if "roots" in sections:
        res["roots"] = []
        for threads in args.root_threads:
            torch.set_num_threads(threads)
            res["roots"] += bench_roots(args.root_sizes, args.root_spectra, threads, args.root_repeats, device)
            save()
        torch.set_num_threads(args.threads)
    if "flops" in sections:
        # the rate again at the end, so a change of load during the run shows
        res["gemm_end"] = [gemm_rate(n, device, 5 if args.quick else 20) for n in args.gemm_sizes]
        if res.get("step_time"):
            gemm = {g["n"]: g for g in res["gemm"]}
            ref = 1024 if 1024 in gemm else max(gemm)
            res["flop_bound"] = flop_bounds(res["step_time"], gemm, ref)

    res["load"] = whole.stop()
    res["meta"]["wall_s"] = round(time.perf_counter() - t0, 2)
    res["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save(complete=True)
    print(report(res))
    print(f"\nwrote {out}")
    return 0


def _source_info() -> dict[str, Any]:
    """The commit and a hash of the scalable_shampoo sources actually imported (the tree may be dirty)."""
    import hashlib
    import subprocess

    import scalable_shampoo

    pkg = Path(scalable_shampoo.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    info: dict[str, Any] = {"sources_sha256": digest.hexdigest()[:16]}  # no paths of this machine
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(
                ["git", *cmd], cwd=pkg, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        info["commit"] = git("rev-parse", "HEAD")
        info["src_dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
