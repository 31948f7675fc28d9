"""The loss lost to staleness: background (latency mode) against inline, per seed, from runs.csv.

Pairs of optimizer labels in one ``runs.csv`` (as written by ``shampoo-bench`` and
``report``), each ``INLINE|BACKGROUND@LR`` (labels hold ``=``, so ``|`` separates them):
for every seed both ran, the final eval metric of each and their difference (background −
inline; positive: the background run ended worse, for a lower-is-better metric), the median difference, and the largest
staleness seen in the background run's ``diagnostics.csv`` (if given). Prints a table and
writes JSON::

    python -m scalable_shampoo_bench.staleness_gap scalable_shampoo_bench/results/lm-ec/runs.csv \\
        --pair "shampoo|shampoo[scheduler='latency']@6e-3" --out gap.json
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from .report import curves, final, read_csv


def staleness(paths: list[Path], optimizer: str, lr: float) -> dict[int, int]:
    """Per seed, the largest ``staleness`` (steps) of any block at any evaluation of that run."""
    out: dict[int, int] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["optimizer"] == optimizer and float(row["lr"]) == lr and row["staleness"] not in ("", "None"):
                    seed = int(row["seed"])
                    out[seed] = max(out.get(seed, 0), int(float(row["staleness"])))
    return out


def gap(runs_csv: Path, inline: str, background: str, lr: float, diagnostics: list[Path]) -> dict[str, Any]:
    runs = curves(read_csv(runs_csv))
    seeds = sorted({s for (o, r, s) in runs if o == inline and r == lr} & {s for (o, r, s) in runs
                                                                          if o == background and r == lr})  # fmt: skip
    if not seeds:
        raise SystemExit(f"no seed ran both {inline!r} and {background!r} at lr {lr}")
    rows = []
    stale = staleness(diagnostics, background, lr)
    for s in seeds:
        a, b = final(runs[(inline, lr, s)]), final(runs[(background, lr, s)])
        rows.append(dict(seed=s, inline=a, background=b, gap=b - a, max_staleness=stale.get(s)))
    return dict(inline=inline, background=background, lr=lr, seeds=rows,
                median_inline=statistics.median(r["inline"] for r in rows),
                median_background=statistics.median(r["background"] for r in rows),
                median_gap=statistics.median(r["gap"] for r in rows))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m scalable_shampoo_bench.staleness_gap", description=doc)
    p.add_argument("runs", type=Path, help="a runs.csv")
    p.add_argument("--pair", action="append", required=True, metavar="INLINE|BACKGROUND@LR")
    p.add_argument("--diagnostics", action="append", default=[], type=Path, help="diagnostics.csv files (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="JSON output file")
    args = p.parse_args(argv)
    results = []
    for spec in args.pair:
        names, _, lr = spec.rpartition("@")
        inline, _, background = names.partition("|")
        results.append(gap(args.runs, inline, background, float(lr), args.diagnostics))
    print("| inline | background | lr | seed | inline final | background final | gap | max staleness |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for s in r["seeds"]:
            print(f"| {r['inline']} | {r['background']} | {r['lr']:g} | {s['seed']} | {s['inline']:.4f} | "
                  f"{s['background']:.4f} | {s['gap']:+.4f} | {s['max_staleness']} |")  # fmt: skip
        print(f"| {r['inline']} | {r['background']} | {r['lr']:g} | median | {r['median_inline']:.4f} | "
              f"{r['median_background']:.4f} | {r['median_gap']:+.4f} | |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "scalable_shampoo_bench.staleness_gap", *argv])
    args.out.write_text(json.dumps({"command": command, "pairs": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
