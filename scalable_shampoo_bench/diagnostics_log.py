"""Log Shampoo's per-block health (``Shampoo.diagnostics()``) to CSV and, optionally, TensorBoard.

One CSV row per (run, step, parameter, block, axis) at every evaluation point;
TensorBoard gets per-run summaries: the largest staleness and residual, the
rejected roots and the skipped steps.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from scalable_shampoo import Shampoo

FIELDS = [
    "task", "optimizer", "lr", "seed", "step", "param", "block", "axis", "dim", "has_root", "root_step",
    "staleness", "residual", "lambda_max", "eps", "rejected", "method", "skipped_steps",
]  # fmt: skip


class DiagnosticsLog:
    """Appends diagnostics rows to ``csv_path``; also to TensorBoard when ``tensorboard_dir`` is given."""

    def __init__(self, csv_path: str, tensorboard_dir: str | None = None) -> None:
        self.csv_path = csv_path
        fresh = not os.path.exists(csv_path)
        self._file = open(csv_path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._csv = csv.DictWriter(self._file, FIELDS)
        if fresh:
            self._csv.writeheader()
        self._tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional dependency
                raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(tensorboard_dir)

    def log(self, opt: Any, run: dict[str, Any], step: int) -> None:
        """Record ``opt``'s diagnostics at ``step`` if it is a Shampoo optimizer (others are ignored)."""
        if not isinstance(opt, Shampoo):
            return
        d = opt.diagnostics()
        for row in d["blocks"]:
            self._csv.writerow({**run, "step": step, "skipped_steps": d["skipped_steps"],
                                **{k: row[k] for k in FIELDS if k in row}})  # fmt: skip
        self._file.flush()
        if self._tb is not None:
            tag = f"{run['task']}/{run['optimizer']}/lr{run['lr']:g}/seed{run['seed']}"
            rows = d["blocks"]

            def worst(key: str) -> float:
                return max((r[key] for r in rows if r[key] is not None), default=math.nan)

            self._tb.add_scalar(f"{tag}/max_staleness", worst("staleness"), step)
            self._tb.add_scalar(f"{tag}/max_residual", worst("residual"), step)
            self._tb.add_scalar(f"{tag}/rejected_roots", sum(r["rejected"] for r in rows), step)
            self._tb.add_scalar(f"{tag}/skipped_steps", d["skipped_steps"], step)
            self._tb.add_scalar(f"{tag}/blocks_with_root", sum(r["has_root"] for r in rows), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
