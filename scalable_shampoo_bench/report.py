"""From curves to the summary: best lr, target, steps and seconds to target; CSV, JSON, Markdown, PNG.

Definitions (also in RESULTS.md):

* a run's *final* metric is its last evaluation (a run that diverged has none: it ranks last);
* an optimizer's *best lr* is the lr with the best median final metric over the seeds that
  every lr of that optimizer was run with;
* *median* over seeds: for an even number of seeds, the worse of the two middle values;
* the *target* is the reference optimizer's (AdamW's) median final metric at its best lr;
* *steps / seconds to target*: the first evaluation at which a run's metric is at least as
  good as the target; the median over seeds at the optimizer's best lr, a run that never
  reaches it counting as infinitely slow (so the median is "not reached" when half the
  seeds or more never reach it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .train import Point

CSV_FIELDS = [f.name for f in dataclasses.fields(Point)]
INF = math.inf


def _key(value: float, higher_is_better: bool) -> float:
    """A sort key where smaller is better and nan is worst."""
    if math.isnan(value):
        return INF
    return -value if higher_is_better else value


def reaches(value: float, target: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return value >= target if higher_is_better else value <= target


def final(curve: Sequence[Point]) -> float:
    return curve[-1].eval_metric if curve else math.nan


def best_value(curve: Sequence[Point], higher_is_better: bool) -> float:
    """The best eval metric at any evaluation after step 0 (what early stopping would keep)."""
    vals = [p.eval_metric for p in curve if p.step > 0 and math.isfinite(p.eval_metric)]
    if not vals:
        return math.nan
    return max(vals) if higher_is_better else min(vals)


def time_to_target(curve: Sequence[Point], target: float, higher_is_better: bool) -> tuple[float, float]:
    """(steps, seconds) at the first evaluation that reaches ``target``; (inf, inf) if none does."""
    for p in curve:
        if reaches(p.eval_metric, target, higher_is_better):
            return float(p.step), p.seconds
    return INF, INF


def median(values: Iterable[float], higher_is_better: bool = False) -> float:
    """The median, with nan (a diverged run) ranked worst; of an even number, the worse middle value
    (so that at least half of the runs are as good as the median)."""
    vals = sorted(values, key=lambda v: _key(v, higher_is_better))
    return vals[len(vals) // 2] if vals else math.nan


def curves(points: Iterable[Point]) -> dict[tuple[str, float, int], list[Point]]:
    """The points of each run, keyed (optimizer, lr, seed), in step order."""
    out: dict[tuple[str, float, int], list[Point]] = defaultdict(list)
    for p in points:
        out[(p.optimizer, p.lr, p.seed)].append(p)
    for c in out.values():
        c.sort(key=lambda p: p.step)
    return dict(out)


def best_lr(runs: dict[tuple[str, float, int], list[Point]], optimizer: str, higher_is_better: bool) -> float:
    lrs = sorted({lr for (o, lr, _) in runs if o == optimizer})
    seed_sets = [{s for (o, lr2, s) in runs if o == optimizer and lr2 == lr} for lr in lrs]
    common = set.intersection(*seed_sets)
    scores = {lr: median((final(runs[(optimizer, lr, s)]) for s in common), higher_is_better) for lr in lrs}
    return min(lrs, key=lambda lr: (_key(scores[lr], higher_is_better), lr))


def _clean(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def summarize(points: Sequence[Point], higher_is_better: bool, reference: str = "adamw") -> dict[str, Any]:
    """The summary of one task's runs (see the module docstring for the definitions)."""
    runs = curves(points)
    optimizers = list(dict.fromkeys(o for (o, _, _) in runs))
    if not optimizers:
        raise ValueError("no runs to summarize")
    ref = reference if reference in optimizers else optimizers[0]
    best = {o: best_lr(runs, o, higher_is_better) for o in optimizers}

    def seeds(o: str, lr: float) -> list[int]:
        return sorted(s for (o2, lr2, s) in runs if o2 == o and lr2 == lr)

    target = median((final(runs[(ref, best[ref], s)]) for s in seeds(ref, best[ref])), higher_is_better)
    table: dict[str, Any] = {}
    for o in optimizers:
        lr = best[o]
        cs = [runs[(o, lr, s)] for s in seeds(o, lr)]
        hits = [time_to_target(c, target, higher_is_better) for c in cs]
        steps = [c[-1].step for c in cs]
        by_lr = {
            f"{lr2:g}": {
                "final_median": _clean(median((final(runs[(o, lr2, s)]) for s in seeds(o, lr2)), higher_is_better)),
                "seeds": len(seeds(o, lr2)),
            }
            for lr2 in sorted({lr2 for (o2, lr2, _) in runs if o2 == o})
        }
        table[o] = {
            "best_lr": lr,
            "seeds": len(cs),
            "final_median": _clean(median((final(c) for c in cs), higher_is_better)),
            "finals": [_clean(final(c)) for c in cs],
            "final_secondary_median": _clean(median((c[-1].secondary for c in cs), True) if cs else math.nan),
            "best_median": _clean(median((best_value(c, higher_is_better) for c in cs), higher_is_better)),
            "steps_to_target": _clean(median(h[0] for h in hits)),
            "seconds_to_target": _clean(median(h[1] for h in hits)),
            "reached": sum(math.isfinite(h[0]) for h in hits),
            "steps": int(statistics.median(steps)),
            "seconds_total": statistics.median(c[-1].seconds for c in cs),
            "ms_per_step": 1000 * statistics.median(c[-1].seconds / max(1, c[-1].step) for c in cs),
            "by_lr": by_lr,
        }
    return {"reference": ref, "target": _clean(target), "higher_is_better": higher_is_better, "optimizers": table}


# --------------------------------------------------------------------------- output files
def write_csv(path: Path, points: Iterable[Point], append: bool = False) -> None:
    new = not append or not path.exists()
    with path.open("a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for p in points:
            w.writerow(dataclasses.asdict(p))


def read_csv(path: Path) -> list[Point]:
    with path.open(newline="") as f:
        return [
            Point(
                r["task"],
                r["optimizer"],
                float(r["lr"]),
                int(r["seed"]),
                int(r["step"]),
                float(r["seconds"]),
                float(r["train_loss"]),
                float(r["eval_metric"]),
                float(r.get("secondary") or "nan"),  # absent from files written before it existed
            )
            for r in csv.DictReader(f)
        ]


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "not reached" if x is None else format(x, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    ref = summary["reference"]
    opts = summary["optimizers"]
    rs, rt = opts[ref]["steps_to_target"], opts[ref]["seconds_to_target"]
    second = summary.get("secondary_metric")
    extra = f" final {second} (median) | best {summary['metric']} (median) |" if second else ""
    lines = [
        f"| optimizer | best lr | final {summary['metric']} (median) | steps to target | seconds to target "
        f"| reached | ms/step | steps vs {ref} | time vs {ref} |" + extra,
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if second else ""),
    ]
    for name, o in opts.items():
        s, t = o["steps_to_target"], o["seconds_to_target"]
        ratio_s = f"{s / rs:.2f}×" if s is not None and rs else "–"
        ratio_t = f"{t / rt:.2f}×" if t is not None and rt else "–"
        cells = f" {_fmt(o.get('final_secondary_median'))} | {_fmt(o.get('best_median'))} |" if second else ""
        lines.append(
            f"| {name} | {o['best_lr']:g} | {_fmt(o['final_median'])} | {_fmt(s, '.0f')} | {_fmt(t, '.1f')} "
            f"| {o['reached']}/{o['seeds']} | {o['ms_per_step']:.0f} | {ratio_s} | {ratio_t} |" + cells
        )
    return "\n".join(lines)


def markdown(summaries: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    out = ["# shampoo-bench results", ""]
    commands = meta["command"] if isinstance(meta["command"], list) else [meta["command"]]
    out.append(
        f"torch {meta['torch']}, device {meta['device']}, {meta['threads']} thread(s); "
        f"other processes used {meta.get('other_cpu_cores')} cores on average. Commands:"
    )
    out += [""] + [f"    {c}" for c in commands + ([meta["merged_by"]] if "merged_by" in meta else [])]
    for task, s in summaries.items():
        out += [
            "",
            f"## {task}: {s['description']}",
            "",
            f"Target ({s['reference']}'s median final {s['metric']} at its best lr): {_fmt(s['target'])}. "
            f"{s['steps']} steps, seeds {s['seeds']}, lr grid {s['lr_grid']}.",
            "",
            markdown_table(s),
            "",
            f"![{task}]({task}.png)",
        ]
    return "\n".join(out) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def plot(path: Path, points: Sequence[Point], summary: dict[str, Any]) -> None:
    """Eval metric against steps and against training seconds, every seed at each optimizer's best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = curves(points)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, o) in enumerate(summary["optimizers"].items()):
        color = colors[i % len(colors)]
        label: str | None = f"{name} (lr {o['best_lr']:g})"
        for (opt, lr, _), c in sorted(runs.items()):
            if opt != name or lr != o["best_lr"]:
                continue
            for ax, x in zip(axes, ([p.step for p in c], [p.seconds for p in c]), strict=True):
                ax.plot(x, [p.eval_metric for p in c], color=color, alpha=0.8, lw=1.2, label=label)
            label = None  # one legend entry per optimizer, however many seeds
    for ax, xlabel in zip(axes, ("step", "training seconds"), strict=True):
        if summary["target"] is not None:
            ax.axhline(summary["target"], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(summary["metric"])
        ax.grid(alpha=0.3)
        _zoom(ax, points, summary)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['task']}: {summary['description']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _zoom(ax: Any, points: Sequence[Point], summary: dict[str, Any]) -> None:
    """Leave out the first, steep part of the curves so the end, where the target is, can be read."""
    vals = [p.eval_metric for p in points if math.isfinite(p.eval_metric) and p.step > 0]
    if not vals or summary["target"] is None:
        return
    finals = [o["final_median"] for o in summary["optimizers"].values() if o["final_median"] is not None]
    lo, hi = min(vals + finals), max(vals)
    span = max(abs(summary["target"] - lo), 0.02 * abs(summary["target"])) or 1.0
    if summary["higher_is_better"]:
        ax.set_ylim(max(lo, summary["target"] - 6 * span), max(vals) + 0.1 * span)
    else:
        ax.set_ylim(lo - 0.1 * span, min(hi, summary["target"] + 6 * span))
