"""Optimizer-step time: Shampoo batched (stacked equal blocks) vs plain (a loop per block) vs AdamW.

Models: (a) 8 × Linear(512, 512), block_size 128 (16 blocks per weight, 128 in all);
(b) 4 × Linear(1024, 1024), block_size 256; (c) as (a) with block_size 32 (2048 blocks,
where per-block overhead, not matmul FLOPs, dominates the plain loop). Shampoo runs with
``start_preconditioning_step=1`` and ``precondition_frequency=100``: the roots are
computed at the first (untimed) step and every timed step uses them, with no
recomputation inside the window. Gradients are fixed random tensors set once.
"matmuls" times the step's batched matmuls alone on ready stacks (a floor for any
implementation: plain/matmuls bounds the speedup that batching can give). The four
are interleaved in chunks of ``--chunk`` steps, in a rotating order, and each step
is timed alone; the table gives medians and ratios. The machine may be shared:
``/proc/loadavg`` is recorded before and after.

    python -m scalable_shampoo_bench.batched_time [--threads 1] [--rounds 18] [--chunk 5] [--device cpu]

Writes ``scalable_shampoo_bench/results/batched_time.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from scalable_shampoo import Shampoo

MODELS = {
    "8x Linear 512x512, block 128": (8, 512, 128),
    "4x Linear 1024x1024, block 256": (4, 1024, 256),
    "8x Linear 512x512, block 32": (8, 512, 32),  # 2048 small blocks: per-block overhead dominates
}


def loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def make_model(layers: int, width: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
    return model


def matmul_floor(layers: int, width: int, block: int, device: str) -> Callable[[], None]:
    """The matmuls of one step alone (H_a ← β₂H_a + w·G₍ₐ₎G₍ₐ₎ᵀ twice, L·G·R), on ready stacks:
    the time no way of looping over the blocks can go below."""
    b = layers * (width // block) ** 2
    g, left, right, s0, s1 = (torch.randn(b, block, block, device=device) for _ in range(5))
    w1, w2 = torch.empty_like(g), torch.empty_like(g)

    def step() -> None:
        s0.baddbmm_(g, g.mT, beta=0.999, alpha=0.001)
        s1.baddbmm_(g.mT, g, beta=0.999, alpha=0.001)
        torch.bmm(torch.bmm(left, g, out=w1), right, out=w2)

    return step


def make_step(name: str, layers: int, width: int, block: int, device: str) -> Callable[[], None]:
    if name == "matmuls":
        return matmul_floor(layers, width, block, device)
    params = list(make_model(layers, width, device).parameters())
    if name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    else:
        opt = Shampoo(params, lr=1e-3, block_size=block, start_preconditioning_step=1,
                      precondition_frequency=100, batched=name == "batched")  # fmt: skip
    opt.step()  # Shampoo: the roots are computed and installed here
    return opt.step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(layers: int, width: int, block: int, rounds: int, chunk: int, device: str) -> dict[str, list[float]]:
    names = ["batched", "plain", "adamw", "matmuls"]
    steps = {n: make_step(n, layers, width, block, device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            for _ in range(chunk):
                sync(device)
                t0 = time.perf_counter()
                steps[n]()
                sync(device)
                times[n].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=18, help="rounds of interleaving (< 99/chunk: no recomputation)")
    ap.add_argument("--chunk", type=int, default=5, help="steps per optimizer per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batched_time.json"))
    args = ap.parse_args()
    if args.rounds * args.chunk >= 99:
        ap.error("rounds × chunk must stay below 99 so that no root is recomputed in the window")
    torch.set_num_threads(args.threads)
    result: dict = dict(
        command="python -m scalable_shampoo_bench.batched_time " + f"--threads {args.threads} --rounds {args.rounds} "
        f"--chunk {args.chunk} --device {args.device}",
        torch=torch.__version__, device=args.device, threads=torch.get_num_threads(),
        machine=platform.machine(), loadavg_before=loadavg(), models={},
    )  # fmt: skip
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    print(f"{'model':34} {'batched ms':>11} {'plain ms':>9} {'AdamW ms':>9} {'matmuls ms':>12} "
          f"{'plain/batched':>14} {'plain/matmuls':>14} {'batched/AdamW':>14}")  # fmt: skip
    for label, (layers, width, block) in MODELS.items():
        times = measure(layers, width, block, args.rounds, args.chunk, args.device)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        blocks = layers * (width // block) ** 2
        result["models"][label] = dict(
            layers=layers, width=width, block_size=block, blocks=blocks, steps_per_optimizer=len(times["plain"]),
            median_ms=med, plain_over_batched=med["plain"] / med["batched"],
            plain_over_matmuls=med["plain"] / med["matmuls"],
            batched_over_adamw=med["batched"] / med["adamw"],
        )  # fmt: skip
        print(f"{label:34} {med['batched']:11.2f} {med['plain']:9.2f} {med['adamw']:9.2f} {med['matmuls']:12.2f} "
              f"{med['plain'] / med['batched']:14.2f} {med['plain'] / med['matmuls']:14.2f} "
              f"{med['batched'] / med['adamw']:14.2f}")  # fmt: skip
    result["loadavg_after"] = loadavg()
    print(f"threads {result['threads']}, torch {result['torch']}, device {args.device}; "
          f"loadavg before {result['loadavg_before']!r}, after {result['loadavg_after']!r}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
