"""scalable_shampoo_bench/plan_sizes.py: the counts behind the README's merge-rule figures."""

from __future__ import annotations

import json
from pathlib import Path

from scalable_shampoo_bench.plan_sizes import main


def test_plan_sizes_counts_fan_in_against_format_1(tmp_path: Path) -> None:
    out = tmp_path / "plan_sizes.json"
    assert main(["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    resnet = res["models"]["resnet/block1024"]
    assert resnet["fan_in"]["numel"] == resnet["format1_left"]["numel"] == 77754
    # a [32, 32, 3, 3] kernel: [32, 288] by fan-in, [1024, 9] under format 1 (largest statistic 288 vs 1024)
    kernel = "blocks.1.conv2.weight"
    assert resnet["fan_in"]["kernels"][kernel] == [[32, 288], 288]
    assert resnet["format1_left"]["kernels"][kernel] == [[1024, 9], 1024]
    assert resnet["fan_in"]["statistics"] < resnet["format1_left"]["statistics"] / 4
    dlrm = res["models"]["ctr_dlrm/block1024"]
    assert dlrm["param_groups_for"]["statistics"] < dlrm["all_axes"]["statistics"] / 10
    mb = res["state_mb_cnn_block1024"]
    assert mb["adamw"] < mb["fan_in"] < mb["format1_left"]
