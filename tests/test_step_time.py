"""Smoke test of scalable_shampoo_bench/step_time.py: it runs, and the JSON has what the report needs."""

from __future__ import annotations

import json
from pathlib import Path

from scalable_shampoo_bench.step_time import MODELS, main


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0


def _blocks(res: dict, model: str, block_size: int) -> int:
    return next(r["blocks"] for r in res["batched"] if r["model"] == model and r["block_size"] == block_size)


def test_quick_run_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "step_time.json"
    assert main(["--quick", "--batched-compare", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())

    assert {"meta", "gemm", "step_time", "end_to_end", "roots", "flop_bound", "batched", "batched_summary", "load"} <= (
        res.keys()
    )
    meta = res["meta"]
    assert meta["threads"] == 1 and meta["quick"] is True and meta["device"] == "cpu"
    assert meta["torch"] and "other_cores" in res["load"]

    models = {"linear4", "chargpt", "transformer", "resnet", "cnn", "embedding"}
    assert set(MODELS) == models
    for section in ("step_time", "end_to_end", "batched"):
        assert {r["model"] for r in res[section]} == models, section
        assert all(r["blocks"] >= 1 for r in res[section]), section
    for r in res["step_time"] + res["end_to_end"]:
        assert r["measured_steps"] >= 2 * r["precondition_frequency"]
        for opt in ("shampoo", "adamw"):
            for k in ("median_ms", "mean_ms", "max_ms"):
                assert _positive(r[opt][k]), (opt, k, r[opt][k])
            assert len(r["raw_ms"][opt]) == r["measured_steps"]
        assert r["shampoo"]["root_steps"] == 2  # two periods: two root recomputations timed
        assert r["root_matrices"] > 0 and r["roots_rejected"] == 0
        for k in ("ratio_median", "ratio_mean", "ratio_max"):
            assert _positive(r[k])
        assert "load" in r
        # the bytes each optimizer holds: Shampoo's memory() by kind, AdamW's two moments (and step)
        assert r["shampoo_bytes"] == sum(v for k, v in r["shampoo_memory"].items() if k != "parameters") > 0
        assert r["adamw_bytes"] >= 2 * r["shampoo_memory"]["parameters"]

    block_sizes = {r["block_size"] for r in res["step_time"]}
    assert {(r["model"], r["block_size"]) for r in res["batched"]} == {(m, b) for m in models for b in block_sizes}
    for r in res["batched"]:
        for opt in ("batched", "plain"):
            for k in ("median_ms", "mean_ms", "max_ms"):
                assert _positive(r[opt][k]), (opt, k, r[opt][k])
            assert len(r["raw_ms"][opt]) == r["measured_steps"]
            assert r[opt]["root_steps"] == 0  # the roots come before the window
        for k in ("plain_over_batched_median", "plain_over_batched_mean", "plain_over_batched_max"):
            assert _positive(r[k])
        assert r["root_matrices"] > 0 and r["roots_rejected"] == {"batched": 0, "plain": 0}
        assert r["max_abs_param_diff"] < 1e-3  # batched and plain take the same steps
        assert "load" in r
    for r in res["step_time"] + res["end_to_end"]:  # the same plans in every section
        assert r["blocks"] == _blocks(res, r["model"], r["block_size"])
    summary = res["batched_summary"]
    assert summary["blocks"] == {m: {str(b): _blocks(res, m, b) for b in block_sizes} for m in models}
    top = summary["most_blocks"]
    assert top["blocks"] == max(r["blocks"] for r in res["batched"])
    assert top["model"] in models and _positive(top["plain_over_batched_median"])
    assert isinstance(summary["goal_met"], bool)

    for r in res["roots"]:
        for k in ("eigh", "newton", "eigh_raw", "newton_raw"):
            assert _positive(r[k]["median_ms"])
        assert r["residual_eigh"] < 0.1 and r["residual_newton"] < 0.1
        assert r["newton_iterations"] >= 1

    assert all(_positive(g["gflops"]) for g in res["gemm"])
    for r in res["flop_bound"]:
        for k in ("step_gflop", "gemm_gflops", "bound_ms", "nonroot_median_over_bound"):
            assert _positive(r[k])


def test_quick_packed_pair_times_packed_against_the_default_layout(tmp_path: Path) -> None:
    out = tmp_path / "packed.json"
    assert main(["--quick", "--sections", "packed", "--models", "linear4", "--block-sizes", "32",
                 "--out", str(out), "--threads", "1"]) == 0  # fmt: skip
    (r,) = json.loads(out.read_text())["packed"]
    for opt in ("packed", "full"):
        assert _positive(r[opt]["median_ms"]) and r[opt]["root_steps"] == 0
    assert r["max_abs_param_diff"] < 1e-4  # the two layouts take the same steps up to rounding
