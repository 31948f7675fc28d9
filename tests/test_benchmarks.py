"""The benchmark package: summaries on hand-made curves, tiny real runs of every task, missing data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from scalable_shampoo_bench import cli, data, report
from scalable_shampoo_bench.optimizers import warmup_cosine
from scalable_shampoo_bench.tasks import TASKS
from scalable_shampoo_bench.train import Point, run


# --------------------------------------------------------------------------- target and time to target
def curve(opt: str, lr: float, seed: int, metrics: list[float], every: int = 10, sec_per_step: float = 0.5):
    return [
        Point("t", opt, lr, seed, i * every, i * every * sec_per_step, math.nan if i == 0 else 1.0, m)
        for i, m in enumerate(metrics)
    ]


def hand_made(higher_is_better: bool = False) -> list[Point]:
    sign = -1 if higher_is_better else 1
    pts: list[Point] = []
    # AdamW, lr 1e-3: finals 3.0, 2.9, 3.1; lr 2e-3: finals 2.5, 2.4, 2.6 (best: target = median 2.5)
    for seed, f in enumerate([3.0, 2.9, 3.1]):
        pts += curve("adamw", 1e-3, seed, [sign * v for v in [5, 4, 3.5, f]])
    for seed, f in enumerate([2.5, 2.4, 2.6]):
        pts += curve("adamw", 2e-3, seed, [sign * v for v in [5, 3.5, 2.8, f]])
    # Shampoo, lr 2e-3: reaches 2.5 at step 20 (seeds 0, 1) and at step 30 (seed 2); 1.5× slower per step
    for seed, m in enumerate([[5, 3, 2.5, 2.2], [5, 3, 2.4, 2.3], [5, 3, 2.7, 2.5]]):
        pts += curve("shampoo", 2e-3, seed, [sign * v for v in m], sec_per_step=0.75)
    # Shampoo, lr 6e-3: diverges (nan) on seed 0 and only that seed was run in the lr search
    pts += curve("shampoo", 6e-3, 0, [sign * v for v in [5, math.nan]])
    return pts


@pytest.mark.parametrize("higher", [False, True])
def test_target_and_time_to_target_on_hand_made_curves(higher: bool) -> None:
    s = report.summarize(hand_made(higher), higher_is_better=higher)
    sign = -1 if higher else 1
    assert s["reference"] == "adamw"
    assert s["target"] == pytest.approx(sign * 2.5)
    adamw, shampoo = s["optimizers"]["adamw"], s["optimizers"]["shampoo"]
    assert adamw["best_lr"] == 2e-3 and shampoo["best_lr"] == 2e-3  # the diverged lr ranks last
    assert adamw["final_median"] == pytest.approx(sign * 2.5)
    # AdamW reaches its own median only at the end, and only on seeds 0 and 1 → median of (30, 30, inf) = 30
    assert adamw["reached"] == 2 and adamw["steps_to_target"] == 30 and adamw["seconds_to_target"] == 15
    # Shampoo: 20, 20, 30 steps → median 20 steps, 20 × 0.75 = 15 s
    assert shampoo["reached"] == 3 and shampoo["steps_to_target"] == 20 and shampoo["seconds_to_target"] == 15
    assert shampoo["final_median"] == pytest.approx(sign * 2.3)
    assert shampoo["by_lr"]["0.006"]["final_median"] is None
    assert shampoo["ms_per_step"] == pytest.approx(750)
    table = report.markdown_table(s | {"metric": "loss"})
    assert "| shampoo | 0.002 |" in table and "0.67×" in table and "1.00×" in table


def test_not_reached_when_most_seeds_miss() -> None:
    pts = curve("adamw", 1e-3, 0, [5, 3, 2]) + curve("adamw", 1e-3, 1, [5, 3, 2])
    pts += curve("shampoo", 1e-3, 0, [5, 4, 1.9]) + curve("shampoo", 1e-3, 1, [5, 4, 3])
    s = report.summarize(pts, higher_is_better=False)
    assert s["target"] == 2 and s["optimizers"]["shampoo"]["reached"] == 1
    assert s["optimizers"]["shampoo"]["steps_to_target"] is None  # median of (20, inf)
    assert "not reached" in report.markdown_table(s | {"metric": "loss"})


def test_time_to_target_and_median_helpers() -> None:
    c = curve("a", 1.0, 0, [5, 4, 3, 2])
    assert report.time_to_target(c, 3.0, False) == (20.0, 10.0)
    assert report.time_to_target(c, 1.0, False) == (math.inf, math.inf)
    assert report.median([1.0, math.nan, 3.0]) == 3.0  # nan ranks worst
    assert report.median([1.0, math.nan, 3.0], higher_is_better=True) == 1.0


def test_schedule_and_lr_grid() -> None:
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.1)
    grid = cli.parse_lr_grid(["1e-3,2e-3", "sgd=0.1"], ["shampoo", "adamw", "sgd"], TASKS["image"])
    assert grid == {"shampoo": [1e-3, 2e-3], "adamw": [1e-3, 2e-3], "sgd": [0.1]}
    assert cli.parse_lr_grid([], ["adamw"], TASKS["lm"]) == {"adamw": [TASKS["lm"].lrs["adamw"]]}


# --------------------------------------------------------------------------- tiny real runs
def _installed(task: str) -> None:
    """Skip when the data package is genuinely not installed (no override of where data is looked for)."""
    try:
        data.require(task)
    except data.MissingData as e:
        pytest.skip(f"data not installed: {e.install}")


@pytest.mark.parametrize("task", list(TASKS))
def test_tiny_compare_writes_well_formed_results(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    _installed(task)
    args = ["compare", "--task", task, "--tiny", "--steps", "4", "--eval-every", "2", "--quiet", "--out", str(tmp_path)]
    if task == "lm":  # the lr search with a second seed at the best lr
        args += ["--seeds", "2", "--tune-seeds", "1", "--lr-grid", "1e-3,3e-3"]
    assert cli.main(args) == 0

    with (tmp_path / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    fields = ["task", "optimizer", "lr", "seed", "step", "seconds", "train_loss", "eval_metric", "secondary"]
    assert list(rows[0]) == fields
    opts = TASKS[task].optimizers
    runs = {(r["optimizer"], r["lr"], r["seed"]) for r in rows}
    assert len(runs) == (2 * len(opts) + len(opts) if task == "lm" else len(opts))
    assert sorted(int(r["step"]) for r in rows) == sorted([0, 2, 4] * len(runs))  # evaluations at 0, 2, 4
    for r in rows:
        assert r["task"] == task and math.isfinite(float(r["eval_metric"])) and float(r["seconds"]) >= 0
        if TASKS[task].secondary_metric == "test AUC":  # the ctr tasks report AUC beside logloss
            assert 0 <= float(r["secondary"]) <= 1
        else:
            assert math.isnan(float(r["secondary"]))

    summary = json.loads((tmp_path / "summary.json").read_text())
    meta, s = summary["meta"], summary["tasks"][task]
    assert meta["threads"] >= 1 and meta["torch"] == torch.__version__ and meta["device"].startswith("cpu")
    assert set(s["optimizers"]) == set(opts) and s["steps"] == 4 and s["target"] is not None
    for o in s["optimizers"].values():
        assert {"best_lr", "final_median", "steps_to_target", "seconds_to_target", "reached"} <= set(o)
    assert (tmp_path / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| optimizer | best lr |" in (tmp_path / "summary.md").read_text()
    with (tmp_path / "diagnostics.csv").open() as f:  # Shampoo's per-block health at each evaluation
        diag = list(csv.DictReader(f))
    assert diag and {r["optimizer"] for r in diag} == {"shampoo"} and {r["step"] for r in diag} == {"2", "4"}


def test_same_model_and_data_order_for_every_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its first root, Shampoo with Adam grafting is AdamW: same seed → the same curve."""
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    _installed("lm")
    a = run(TASKS["lm"], "adamw", 1e-3, 7, 6, tiny=True, eval_every=3)
    b = run(TASKS["lm"], "shampoo", 1e-3, 7, 6, tiny=True, eval_every=3)
    assert [p.eval_metric for p in a] == pytest.approx([p.eval_metric for p in b], rel=1e-5)
    c = run(TASKS["lm"], "adamw", 1e-3, 8, 6, tiny=True, eval_every=3)
    assert [p.eval_metric for p in c] != [p.eval_metric for p in a]


# --------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("task", list(TASKS))
def test_missing_data_names_the_install_command(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))  # an empty folder: nothing is installed there
    out = tmp_path / "out"
    assert cli.main(["--task", task, "--tiny", "--steps", "2", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert data.INSTALL[task] in err and "not installed" in err
    assert not (out / "summary.json").exists()


# --------------------------------------------------------------------------- the command line
def test_no_arguments_is_the_lm_job() -> None:
    args = cli.build_parser().parse_args([])
    optimizers, grid, steps = cli._plan(TASKS["lm"], args)
    assert (args.task, args.seeds, args.threads, args.out) == ("lm", 1, cli.DEFAULT_THREADS, cli.DEFAULT_OUT)
    assert optimizers == ["shampoo", "adamw"] and steps == TASKS["lm"].default_steps
    assert all(len(v) == 1 for v in grid.values())


def test_report_merges_runs_made_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    _installed("lm")
    common = ["--task", "lm", "--tiny", "--steps", "2", "--eval-every", "1", "--quiet", "--optimizers", "adamw"]
    for seed in (0, 1):
        assert cli.main([*common, "--first-seed", str(seed), "--out", str(tmp_path / f"s{seed}")]) == 0
    assert cli.main(["report", str(tmp_path / "s0"), str(tmp_path / "s1" / "runs.csv"), "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["tasks"]["lm"]["seeds"] == [0, 1] and len(s["meta"]["command"]) == 2
    assert (tmp_path / "lm.png").exists() and len(report.read_csv(tmp_path / "runs.csv")) == 2 * 3
    with pytest.raises(SystemExit):  # the same run twice
        cli.main(["report", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "x")])
    # seed 0 also tried another lr; --keep summarizes only the lr that every seed ran
    assert cli.main([*common, "--lr-grid", "5e-3", "--out", str(tmp_path / "s0b")]) == 0
    inputs = [str(tmp_path / d) for d in ("s0", "s1", "s0b")]
    assert cli.main(["report", *inputs, "--out", str(tmp_path / "all")]) == 0
    assert len(json.loads((tmp_path / "all" / "summary.json").read_text())["tasks"]["lm"]["lr_grid"]["adamw"]) == 2
    lr = report.read_csv(tmp_path / "s0" / "runs.csv")[0].lr
    assert cli.main(["report", *inputs, "--keep", f"adamw={lr}", "--out", str(tmp_path / "kept")]) == 0
    kept = json.loads((tmp_path / "kept" / "summary.json").read_text())["tasks"]["lm"]
    assert kept["lr_grid"]["adamw"] == [lr] and kept["seeds"] == [0, 1]


def test_unknown_command_and_step_time_wiring(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["step-time", "--help"])
    assert e.value.code == 0


def test_shampoo_variants_parse_and_reach_the_optimizer() -> None:
    from torch import nn

    from scalable_shampoo_bench.cli import _names
    from scalable_shampoo_bench.optimizers import is_known, make_optimizer, shampoo_variant

    spec = "shampoo,shampoo[precondition_frequency=10;betas=(0.9,0.99)],adamw"
    names = _names(spec)
    assert names == ["shampoo", "shampoo[precondition_frequency=10;betas=(0.9,0.99)]", "adamw"]
    assert shampoo_variant(names[1]) == {"precondition_frequency": 10, "betas": (0.9, 0.99)}
    assert shampoo_variant("shampoo") is None and is_known(names[1]) and not is_known("shampo")
    opt = make_optimizer(names[1], nn.Linear(3, 2), lr=2e-3, weight_decay=0.01)
    group = opt.param_groups[0]
    assert group["precondition_frequency"] == 10 and group["betas"] == (0.9, 0.99) and group["lr"] == 2e-3
    with pytest.raises(ValueError, match=r"block_size='big' is not a Python literal"):
        shampoo_variant("shampoo[block_size=big]")
    with pytest.raises(ValueError, match=r"expected shampoo\[key=value;…\], got 'block_size'"):
        shampoo_variant("shampoo[block_size]")


def test_schedule_time_writes_the_ratio_and_one_build_each(tmp_path: Path) -> None:
    from scalable_shampoo_bench import schedule_time

    out = tmp_path / "schedule_time.json"
    schedule_time.main(["--dim", "32", "--layers", "2", "--block-size", "16", "--steps", "12", "--start", "2",
                        "--out", str(out)])  # fmt: skip
    d = json.loads(out.read_text())
    assert d["bucket_builds"] == {"constant": 1, "onecycle": 1}
    assert d["beta1_range"][0] < d["beta1_range"][1]  # β₁ really cycled
    med = d["median_step_s"]
    assert d["ratio_onecycle_over_constant"] == pytest.approx(med["onecycle"] / med["constant"])
    assert len(d["step_s"]["onecycle"]) == len(d["step_s"]["constant"]) == 12
def test_auc_equals_the_pairwise_definition_with_ties() -> None:
    from scalable_shampoo_bench.tasks import auc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    labels = (torch.rand(40, generator=g) < 0.4).float()
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert abs(auc(scores, labels) - float(pairs.mean())) < 1e-12
    assert auc(torch.arange(4.0), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert math.isnan(auc(torch.arange(3.0), torch.zeros(3)))


def test_ctr_shampoo_preconditions_tables_on_their_d_side_only() -> None:
    from scalable_shampoo_bench.optimizers import make_optimizer

    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4))
    helper = make_optimizer("shampoo", model, 1e-3, 0.0, embedding_groups=True)
    full = make_optimizer("shampoo_full_tables", model, 1e-3, 0.0, embedding_groups=True)
    rows = {r["name"]: r for r in helper.plan_table(model).rows}  # type: ignore[attr-defined]
    assert rows["0.weight"]["preconditioned"] == [(1,)]
    assert {r["name"]: r for r in full.plan_table(model).rows}["0.weight"]["preconditioned"] == [(0,), (1,)]  # type: ignore[attr-defined]
    assert TASKS["ctr"].embedding_groups and TASKS["ctr_onepass"].embedding_groups


def test_a_variant_s_embedding_axes_reach_the_tables_group_only() -> None:
    from scalable_shampoo_bench.optimizers import make_optimizer

    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4))
    adam_tables = make_optimizer(
        "shampoo[embedding_axes=();exponent_override=2]", model, 1e-3, 0.0, embedding_groups=True
    )
    rows = {r["name"]: r for r in adam_tables.plan_table(model).rows}  # type: ignore[attr-defined]
    assert rows["0.weight"]["preconditioned"] == []  # no statistic: the grafting update alone
    assert rows["1.weight"]["preconditioned"] == [(0,), (1,)]  # the Linear is unchanged
    assert all(g["exponent_override"] == 2 for g in adam_tables.param_groups)  # the rest reaches Shampoo
    both = make_optimizer("shampoo[embedding_axes=None]", model, 1e-3, 0.0, embedding_groups=True)
    assert {r["name"]: r for r in both.plan_table(model).rows}["0.weight"]["preconditioned"] == [(0,), (1,)]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"embedding_axes applies only to tasks with embedding groups"):
        make_optimizer("shampoo[embedding_axes=()]", model, 1e-3, 0.0)
