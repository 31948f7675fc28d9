"""``scalable_shampoo_bench.staleness_gap``: background − inline final metric per seed, from real files."""

import json
import math

from scalable_shampoo_bench.report import write_csv
from scalable_shampoo_bench.staleness_gap import main
from scalable_shampoo_bench.train import Point


def test_gap_per_seed_median_and_staleness(tmp_path, capsys):
    points = []
    for seed, (a, b) in enumerate([(2.0, 2.1), (3.0, 2.9), (1.0, 1.5)]):
        for name, value in (("in", a), ("bg", b)):
            points += [Point("lm", name, 0.01, seed, 0, 0.0, math.nan, 9.0),
                       Point("lm", name, 0.01, seed, 20, 1.0, 3.0, value)]  # fmt: skip
    points.append(Point("lm", "bg", 0.02, 0, 20, 1.0, 3.0, 0.0))  # another lr: not paired
    write_csv(tmp_path / "runs.csv", points)
    diag = tmp_path / "diagnostics.csv"
    diag.write_text("task,optimizer,lr,seed,step,staleness\nlm,bg,0.01,0,20,7\nlm,bg,0.01,0,40,3\nlm,in,0.01,0,20,30\n"
                    "lm,bg,0.01,1,20,\n")
    out = tmp_path / "gap.json"
    main([str(tmp_path / "runs.csv"), "--pair", "in|bg@1e-2", "--diagnostics", str(diag), "--out", str(out)])
    result = json.loads(out.read_text())["pairs"][0]
    gaps = [round(s["gap"], 6) for s in result["seeds"]]
    assert gaps == [0.1, -0.1, 0.5] and math.isclose(result["median_gap"], 0.1)
    assert [s["max_staleness"] for s in result["seeds"]] == [7, None, None]
    assert "| median |" in capsys.readouterr().out
