"""The text report of a step-time result, printed at the end of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .roots import ROOT_P


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


def _mib(n: int | None) -> float | None:
    """Bytes as MiB (2²⁰ bytes), one decimal; None for records written before memory was recorded."""
    return None if n is None else round(n / 2**20, 1)


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
        "x med", "x mean", "x max", "sh MiB", "aw MiB", "others",
    ]  # fmt: skip

    def step_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
        return [
            [
                r["model"], r["block_size"], r["precondition_frequency"], r["blocks"],
                r["shampoo"]["median_ms"], r["shampoo"]["mean_ms"], r["shampoo"]["max_ms"],
                r["shampoo"]["root_step_median_ms"], r["adamw"]["median_ms"], r["adamw"]["mean_ms"],
                r["adamw"]["max_ms"], r["ratio_median"], r["ratio_mean"], r["ratio_max"],
                _mib(r.get("shampoo_bytes")), _mib(r.get("adamw_bytes")), _load_str(r["load"]),
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
    if res.get("packed"):
        parts += ["", "Shampoo step alone, packed_storage=True against the default layout; no root recomputation "
                  "in the window (ms; x = packed/full: > 1 when packed is slower)"]  # fmt: skip
        rows = [
            [
                r["model"], r["block_size"], r["blocks"], r["packed"]["median_ms"], r["full"]["median_ms"],
                round(r["packed"]["median_ms"] / r["full"]["median_ms"], 3),
                round(r["packed"]["mean_ms"] / r["full"]["mean_ms"], 3),
                f"{r['max_abs_param_diff']:.1e}", _load_str(r["load"]),
            ]
            for r in res["packed"]
        ]  # fmt: skip
        headers = ["model", "block", "blocks", "packed med", "full med", "x med", "x mean", "param diff", "others"]
        parts.append(_table(headers, rows))
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
