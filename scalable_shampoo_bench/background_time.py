"""Inline vs background roots: step time and end-to-end time on this machine.

A regression MLP of ``--layers`` Linear layers ``--dim``×``--dim`` (block_size =
dim, so every weight has two dim×dim statistics whose roots are expensive), trained
for ``--steps`` steps with eigh roots every ``--freq`` steps. The variants run
interleaved (A B C … A B C …) ``--repeats`` times; the table gives medians over
repeats of: per-step wall time (median, mean, max, max/median), end-to-end time
(including, after the last step, the wait for root jobs still computing: ``drain_s``),
the final loss, and the share of the machine's CPU time that other processes used
(``machine.CpuLoad``: /proc/stat, less this process and its root workers; steal not counted).

    python -m scalable_shampoo_bench.background_time            # ~5–8 minutes on 2 cores

``--model linear4`` / ``--model transformer256`` run issue 17's models instead (4 × Linear
1024², and a Transformer d=256 with 4 layers and feed-forward 2048, both at block 1024),
and the table adds the median forward + backward time. A variant names its workers'
settings: ``bg-latency-process-1t-n19`` is latency mode, one worker process with 1 torch
thread at nice 19.

Writes ``scalable_shampoo_bench/results/background_time.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots, InlineRoots, RootScheduler

from .machine import CpuLoad, process_cpu_s


def make_scheduler(name: str, delay: int, staleness: int) -> RootScheduler:
    if name == "inline":
        return InlineRoots()
    mode, workers, *extra = name.split("-")[1:]  # bg-<mode>-<workers>[-<threads>t][-n<nice>]
    kw: dict[str, Any] = dict(workers=workers)
    for e in extra:
        if e.endswith("t"):
            kw["num_threads"] = int(e[:-1])
        elif e.startswith("n"):
            kw["nice"] = int(e[1:])
        else:
            raise ValueError(f"variant {name!r}: {e!r} is neither <threads>t nor n<nice>")
    if mode == "det":
        return BackgroundRoots("deterministic", delay=delay, **kw)
    return BackgroundRoots("latency", max_staleness=staleness, **kw)


def make_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int, Any]:
    """The model, its block size, and ``batch(i) → (input, target)``.

    ``mlp``: ``--layers`` Linear ``--dim``² with tanh, block ``--dim``, targets from a tanh
    teacher on ``--batch`` random rows. ``linear4`` and ``transformer256``: issue 17's models
    at block 1024: 4 × Linear 1024² (512 random rows), and ``nn.TransformerEncoder`` d=256,
    4 layers, 8 heads, feed-forward 2048 (8 × 64 random tokens); MSE to random targets."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if args.model == "mlp":
        dims = [args.dim] * (args.layers + 1)
        layers: list[torch.nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        teacher = torch.nn.Linear(args.dim, args.dim)
        xs = [torch.randn(args.batch, args.dim, generator=gen) for _ in range(8)]
        with torch.no_grad():
            data = [(x, torch.tanh(teacher(x))) for x in xs]
        return torch.nn.Sequential(*layers[:-1]), args.dim, lambda i: data[i % len(data)]
    if args.model == "linear4":
        model: torch.nn.Module = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
        size: tuple[int, ...] = (512, 1024)
    else:
        layer = torch.nn.TransformerEncoderLayer(256, 8, 2048, dropout=0.0, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        size = (8, 64, 256)
    data = [(torch.randn(size, generator=gen), torch.randn(size, generator=gen)) for _ in range(4)]
    return model, 1024, lambda i: data[i % len(data)]


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, block, batch = make_model(args)
    sched = make_scheduler(name, args.delay, args.staleness)
    opt = Shampoo(model.parameters(), lr=args.lr, block_size=block, precondition_frequency=args.freq,
                  start_preconditioning_step=args.freq, root_method="eigh", scheduler=sched)
    time.sleep(args.warmup)  # a worker process imports torch meanwhile, as a real run's data loading would
    workers = [r.process.pid for r in getattr(sched, "_runners", [])]  # worker processes, if any
    load, workers_cpu0 = CpuLoad(), sum(map(process_cpu_s, workers))
    step_times, opt_times = [], []
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for i in range(args.steps):
        ts = time.perf_counter()
        x, y = batch(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        to = time.perf_counter()
        opt.step()
        te = time.perf_counter()
        step_times.append(te - ts)
        opt_times.append(te - to)
    # every root job submitted is paid for: wait for the ones still computing (state_dict waits),
    # so a background run is not credited with work it left unfinished when the loop ended
    td = time.perf_counter()
    opt.scheduler.state_dict()
    drain = time.perf_counter() - td
    total = time.perf_counter() - t0
    other = load.stop(extra_own=sum(map(process_cpu_s, workers)) - workers_cpu0)["other_busy_fraction"]
    opt.close()
    med = statistics.median(step_times)
    return dict(
        variant=name, total_s=total, step_median_s=med, step_mean_s=statistics.fmean(step_times),
        step_max_s=max(step_times), max_over_median=max(step_times) / med,
        opt_median_s=statistics.median(opt_times), opt_max_s=max(opt_times), final_loss=float(loss.detach()),
        fwd_bwd_median_s=statistics.median(s - o for s, o in zip(step_times, opt_times)),
        drain_s=drain,
        other_cpu_frac=math.nan if other is None else other,  # nan: no /proc/stat here
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mlp", "linear4", "transformer256"), default="mlp",
                    help="mlp: --layers × Linear --dim² (block --dim); linear4, transformer256: issue 17's, block 1024")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--freq", type=int, default=20)
    ap.add_argument("--delay", type=int, default=5)
    ap.add_argument("--staleness", type=int, default=19)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--variants", default="inline,bg-latency-process,bg-latency-thread,bg-det-process,bg-det-thread",
        help="comma list: inline, bg-<det|latency>-<process|thread>[-<n>t][-n<nice>]",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "background_time.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants:  # interleaved
            r = run(v, args)
            runs[v].append(r)
            print(f"[{rep}] {v:24s} total {r['total_s']:6.1f}s  step med {r['step_median_s'] * 1e3:6.0f}ms "
                  f"max {r['step_max_s'] * 1e3:6.0f}ms  other-cpu {r['other_cpu_frac']:.0%}", flush=True)
    keys = ["total_s", "step_median_s", "step_mean_s", "step_max_s", "max_over_median", "opt_median_s",
            "opt_max_s", "fwd_bwd_median_s", "drain_s", "final_loss", "other_cpu_frac"]
    summary = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    base = summary[variants[0]]["total_s"]
    what = f"{args.layers}×Linear({args.dim}), batch {args.batch}" if args.model == "mlp" else args.model
    print(f"\ntorch threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"{what}, {args.steps} steps, roots every {args.freq} "
          f"(eigh), medians of {args.repeats} interleaved repeats")
    print(f"{'variant':24s} {'total s':>8s} {'vs ' + variants[0]:>10s} {'step med':>9s} {'mean':>7s} {'max':>7s} "
          f"{'max/med':>7s} {'fwd+bwd':>8s} {'loss':>8s} {'other cpu':>9s}")
    for v, s in summary.items():
        print(f"{v:24s} {s['total_s']:8.1f} {s['total_s'] / base:10.2f} {s['step_median_s'] * 1e3:7.0f}ms "
              f"{s['step_mean_s'] * 1e3:5.0f}ms {s['step_max_s'] * 1e3:5.0f}ms {s['max_over_median']:7.2f} "
              f"{s['fwd_bwd_median_s'] * 1e3:6.0f}ms "
              f"{s['final_loss']:8.5f} {s['other_cpu_frac']:9.0%}")
    out = dict(config=vars(args) | {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                    "torch": torch.__version__, "cpus": os.cpu_count()},
               summary=summary, runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
