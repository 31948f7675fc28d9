"""``shampoo-bench``: Shampoo against AdamW (and SGD) on small real workloads.

shampoo-bench                     the lm task, Shampoo vs AdamW, about 5 minutes on 2 CPU cores
shampoo-bench compare --task …    any task, optimizers, lr grid, seeds (see --help)
shampoo-bench step-time …         the optimizer's step time alone (scalable_shampoo_bench.step_time)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import report
from .data import MissingData, require
from .diagnostics_log import DiagnosticsLog
from .machine import CpuMonitor, describe
from .optimizers import OPTIMIZERS, is_known
from .tasks import TASKS, Task
from .train import Point, run

DEFAULT_OUT = "shampoo-bench-results"
DEFAULT_THREADS = 1  # measured: on a 2-core machine that something else also uses, 1 thread is faster


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_lr_grid(entries: Sequence[str], optimizers: Sequence[str], task: Task) -> dict[str, list[float]]:
    """``["1e-3,3e-3", "sgd=0.05,0.1"]`` → a grid per optimizer; an optimizer not named takes the
    unnamed grid, or the task's default lr when there is none."""
    shared: list[float] | None = None
    named: dict[str, list[float]] = {}
    for entry in entries:
        if "=" in entry:
            name, values = entry.split("=", 1)
            named[name.strip()] = _floats(values)
        else:
            shared = _floats(entry)
    unknown = set(named) - set(optimizers)
    if unknown:
        raise SystemExit(f"--lr-grid names {', '.join(sorted(unknown))}, which are not in --optimizers")
    grid = {}
    for o in optimizers:
        default = [task.lrs[o]] if o in task.lrs else None
        lrs = named.get(o) or (shared if shared and o != "sgd" else None) or default
        if not lrs:
            raise SystemExit(f"no lr for {o} on task {task.name}: give one with --lr-grid {o}=LR[,LR…]")
        grid[o] = lrs
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shampoo-bench [compare]",
        description="Train the same model on the same data order, seeds and schedule (linear warm-up, "
        "cosine decay) with each optimizer; write runs.csv, summary.json, summary.md and one PNG per task.",
        epilog="Also: 'shampoo-bench report --help' (merge compare runs), "
        "'shampoo-bench step-time --help' (the optimizer step alone). "
        "With no arguments: the lm task, Shampoo vs AdamW, about 5 minutes on 2 CPU cores.",
    )
    p.add_argument("--task", default="lm", help=f"comma-separated, or 'all': {', '.join(TASKS)} (default lm)")
    p.add_argument(
        "--optimizers",
        help=f"comma-separated from {', '.join(OPTIMIZERS)}, or shampoo[key=value;…] for Shampoo with "
        "other settings, e.g. 'shampoo[precondition_frequency=10;block_size=256]' (default: the task's)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps per run (default: the task's budget)")
    budget.add_argument("--epochs", type=float, help="training epochs per run, instead of --steps")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds per optimizer and lr (default 1)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are S..S+K-1 (default 0)")
    p.add_argument(
        "--tune-seeds",
        type=int,
        help="run the whole lr grid on only the first N seeds, then only each optimizer's best lr on the "
        "remaining seeds (default: the whole grid on every seed)",
    )
    p.add_argument(
        "--lr-grid",
        action="append",
        default=[],
        metavar="[OPT=]LR,LR,…",
        help="learning rates to try; without OPT= for every optimizer but sgd; repeatable "
        "(default: the task's tuned lr for each optimizer)",
    )
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: the task's)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="also log Shampoo's diagnostics to TensorBoard in DIR")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tiny data and models, for tests
    return p


def _names(spec: str) -> list[str]:
    """Split a comma list, keeping commas inside ``shampoo[…]`` (``betas=(0.9,0.99)``)."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [o for o in [*out, cur.strip()] if o]


def _tasks(spec: str) -> list[Task]:
    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise SystemExit(f"unknown task {', '.join(bad)}; choose from {', '.join(TASKS)} or 'all'")
    return [TASKS[n] for n in names]


def _plan(task: Task, args: argparse.Namespace) -> tuple[list[str], dict[str, list[float]], int]:
    optimizers = _names(args.optimizers) if args.optimizers else list(task.optimizers)
    try:
        bad = [o for o in optimizers if not is_known(o)]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if bad:
        raise SystemExit(
            f"unknown optimizer {', '.join(bad)}; choose from {', '.join(OPTIMIZERS)} or shampoo[key=value;…]"
        )
    grid = parse_lr_grid(args.lr_grid, optimizers, task)
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None:
        steps = round(args.epochs * task.steps_per_epoch(args.tiny))
    else:
        steps = task.default_steps
    if steps < 1:
        raise SystemExit("the budget must be at least one step")
    return optimizers, grid, steps


class Progress:
    """A tqdm bar over all steps of all runs (nothing with --quiet)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def run(self, label: str) -> Any:
        if self.bar is not None:
            self.bar.set_description(label)

        def on_step(step: int, loss: float) -> None:
            if self.bar is not None:
                self.bar.update(1)
                if step % 10 == 0:
                    self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        return on_step

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compare_task(task: Task, args: argparse.Namespace, out: Path) -> list[Point]:
    """Every run of one task, interleaved (A B A B …), appended to out/runs.csv as each finishes."""
    optimizers, grid, steps = _plan(task, args)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tune = seeds[: args.tune_seeds] if args.tune_seeds else seeds
    rest = [s for s in seeds if s not in tune]
    width = max(len(v) for v in grid.values())
    first = [(o, grid[o][i], s) for s in tune for i in range(width) for o in optimizers if i < len(grid[o])]
    progress = Progress((len(first) + len(rest) * len(optimizers)) * steps, args.quiet)
    points: list[Point] = []
    # Shampoo's per-block health at every evaluation: out/diagnostics.csv (+ TensorBoard)
    diagnostics = DiagnosticsLog(str(out / "diagnostics.csv"), getattr(args, "tensorboard", None))

    def go(o: str, lr: float, seed: int) -> None:
        curve = run(
            task,
            o,
            lr,
            seed,
            steps,
            tiny=args.tiny,
            device=args.device,
            eval_every=args.eval_every,
            on_step=progress.run(f"{task.name} {o} lr={lr:g} seed={seed}"),
            on_eval=lambda opt, step: diagnostics.log(opt, dict(task=task.name, optimizer=o, lr=lr, seed=seed), step),
        )
        report.write_csv(out / "runs.csv", curve, append=True)
        points.extend(curve)
        last = curve[-1]
        progress.note(
            f"{task.name} {o:8s} lr={lr:<7g} seed={seed}: {task.metric} {last.eval_metric:.4f} "
            f"after {last.step} steps, {last.seconds:.1f} s"
        )

    try:
        for o, lr, s in first:
            go(o, lr, s)
        if rest:
            best = {o: report.best_lr(report.curves(points), o, task.higher_is_better) for o in optimizers}
            for s in rest:
                for o in optimizers:
                    go(o, best[o], s)
    finally:
        progress.close()
        diagnostics.close()
    return points


def compare(args: argparse.Namespace) -> int:
    tasks = _tasks(args.task)
    for task in tasks:
        require(task.name)  # every task's data, before any training starts
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch")
    if args.seeds < 1 or args.threads < 1 or (args.tune_seeds is not None and args.tune_seeds < 1):
        raise SystemExit("--seeds, --tune-seeds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set, or parallel work has started in this process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.csv").unlink(missing_ok=True)
    meta = describe(device, args.threads) | {"command": shlex.join(["shampoo-bench", *args.argv])}
    results: dict[str, list[Point]] = {}
    grids: dict[str, tuple[dict[str, list[float]], int]] = {}
    monitor = CpuMonitor()
    for task in tasks:
        optimizers, grid, steps = _plan(task, args)
        grids[task.name] = ({o: grid[o] for o in optimizers}, steps)
        results[task.name] = compare_task(task, args, out)
    load = monitor.stop()
    meta |= {"other_cpu_cores": load["other_cores"], "own_cpu_cores": load["own_cores"], "wall_s": load["wall_s"]}
    summaries = {
        name: task_summary(TASKS[name], pts, grids[name][1], grids[name][0], args.tune_seeds or args.seeds)
        for name, pts in results.items()
    }
    finish(out, results, summaries, meta)
    return 0


def task_summary(
    task: Task, points: list[Point], steps: int, grid: dict[str, list[float]], tune_seeds: int | None
) -> dict[str, Any]:
    return {
        "task": task.name,
        "description": task.description,
        "metric": task.metric,
        "secondary_metric": task.secondary_metric,
        "steps": steps,
        "seeds": sorted({p.seed for p in points}),
        "tune_seeds": tune_seeds,
        "lr_grid": grid,
        **report.summarize(points, task.higher_is_better),
    }


def finish(out: Path, results: dict[str, list[Point]], summaries: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write summary.json, summary.md and one PNG per task, and print the tables."""
    for name, pts in results.items():
        report.plot(out / f"{name}.png", pts, summaries[name])
    report.write_json(out / "summary.json", {"meta": meta, "tasks": summaries})
    (out / "summary.md").write_text(report.markdown(summaries, meta))
    for name, s in summaries.items():
        print(f"\n{name}: {s['description']}")
        print(f"target = {s['reference']}'s median final {s['metric']} at its best lr = {s['target']}")
        print(report.markdown_table(s))
    print(f"\n{meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}; wrote {out}/")


def merge(argv: Sequence[str]) -> int:
    """``shampoo-bench report``: one summary of several compare runs (say, one per seed, run side by side)."""
    p = argparse.ArgumentParser(
        prog="shampoo-bench report",
        description="Summarize the runs.csv of several 'compare' runs as one (their summary.json "
        "beside them gives the machine details). Writes runs.csv, summary.json, summary.md and PNGs.",
    )
    p.add_argument("inputs", nargs="+", help="runs.csv files, or folders holding one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="OPT=LR[,LR…]",
        help="summarize only these lrs of OPT (e.g. the lr tuned on the first seed, when later seeds ran it alone)",
    )
    args = p.parse_args(argv)
    keep = {name.strip(): set(_floats(v)) for name, _, v in (k.partition("=") for k in args.keep)}
    points: list[Point] = []
    metas: list[dict[str, Any]] = []
    for x in args.inputs:
        path = Path(x) / "runs.csv" if Path(x).is_dir() else Path(x)
        points += [q for q in report.read_csv(path) if q.optimizer not in keep or q.lr in keep[q.optimizer]]
        if (path.parent / "summary.json").exists():
            metas.append(json.loads((path.parent / "summary.json").read_text())["meta"])
    seen = [(q.task, q.optimizer, q.lr, q.seed) for q in points if q.step == 0]
    if len(seen) != len(set(seen)):
        raise SystemExit("the same run (task, optimizer, lr, seed) is in more than one input")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "runs.csv", points)
    results: dict[str, list[Point]] = {}
    for q in points:
        results.setdefault(q.task, []).append(q)
    summaries = {}
    for name, pts in results.items():
        grid = {o: sorted({q.lr for q in pts if q.optimizer == o}) for o in dict.fromkeys(q.optimizer for q in pts)}
        summaries[name] = task_summary(TASKS[name], pts, max(q.step for q in pts), grid, None)
    meta: dict[str, Any] = {"torch": "?", "device": "?", "threads": "?", "command": []}
    if metas:  # a value the inputs disagree on is kept as the list of all of them
        meta = dict(metas[0])
        for key in ("command", "other_cpu_cores", "own_cpu_cores", "wall_s", "threads", "library_sha256"):
            values = [m.get(key) for m in metas]
            meta[key] = values[0] if len(set(map(str, values))) == 1 else values
    meta["merged_by"] = shlex.join(["shampoo-bench", "report", *argv])
    finish(out, results, summaries, meta)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["step-time"]:
        from . import step_time  # imported only when asked for

        return int(step_time.main(argv[1:]) or 0)
    if argv[:1] == ["report"]:
        return merge(argv[1:])
    if argv[:1] == ["compare"]:
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"shampoo-bench: unknown command {argv[0]!r}; use 'compare', 'report' or 'step-time'", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return compare(args)
    except MissingData as e:
        print(f"shampoo-bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
