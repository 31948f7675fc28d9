"""Checkpoints of format 1 (dims merged from the left) under fan-in grouping: a
parameter whose plan is the same under both rules loads and continues exactly; any
other is refused, naming it, even when its statistics have the shapes we expect."""

import copy
from pathlib import Path

import pytest
import torch

from scalable_shampoo import FORMAT_VERSION, Shampoo
from scalable_shampoo.blocks import make_plan

FIXTURE = Path(__file__).parent / "data" / "format1.pt"  # made by data/make_format1.py with the format-1 library
SHAPES = {"linear": (16, 32), "conv": (8, 4, 3, 3), "cube": (8, 8, 8, 8), "conv_same": (16, 4, 3, 3)}


def _setup() -> tuple[dict, dict[str, torch.nn.Parameter], Shampoo]:
    saved = torch.load(FIXTURE, weights_only=True)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    groups = [
        dict(params=[params["linear"], params["conv"]]),
        dict(params=[params["cube"]], merge_dims_bound=512, block_size=8),
        dict(params=[params["conv_same"]], merge_dims_bound=36),
    ]
    opt = Shampoo(groups, lr=1e-2, start_preconditioning_step=10, precondition_frequency=2)
    return saved, params, opt


def test_the_fixture_is_format_1_and_this_is_format_2():
    saved = torch.load(FIXTURE, weights_only=True)
    assert saved["optimizer"]["scalable_shampoo"]["format_version"] == 1
    assert FORMAT_VERSION == 2


def test_a_parameter_merged_differently_is_refused_by_name():
    saved, params, opt = _setup()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(8, 4, 3, 3\) into \(8, 4, 3, 3\); "
                                         r"fan-in grouping merges it into \(8, 36\)"):  # fmt: skip
        opt.load_state_dict(saved["optimizer"])
    assert opt.state_dict()["state"] == before["state"] == {}


def test_equal_statistic_shapes_of_other_dims_are_refused():
    saved, params, opt = _setup()
    sd = saved["optimizer"]
    del sd["state"][1]  # the conv above; the cube is next
    cube = sd["state"][2]
    new_plan = make_plan((8, 8, 8, 8), 8, 4096, 512, False)
    expected = {f"stat.{b}.{a}": (blk.shape[a],) * 2 for b, blk in enumerate(new_plan.blocks) for a in blk.axes}
    got = {k: tuple(v.shape) for k, v in cube.items() if k.startswith("stat.")}
    assert got == expected  # a check of shapes alone would load these 8×8 statistics into the wrong dims
    with pytest.raises(ValueError, match=r"parameter 2 of shape \(8, 8, 8, 8\) into \(512, 8\); fan-in grouping "
                                         r"merges it into \(8, 512\), so its statistics do not apply"):  # fmt: skip
        opt.load_state_dict(sd)


def test_parameters_with_an_unchanged_plan_load_and_continue_exactly():
    saved, params, opt = _setup()
    sd = saved["optimizer"]
    for pid in (1, 2):  # refused above: restart their state, as the error says
        del sd["state"][pid]
    opt.load_state_dict(sd)
    assert opt.global_step == 12 and "root.0.1" in opt.state[params["conv_same"]]
    for g in saved["grads_after"]:  # 4 steps, a root recomputation among them
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
    for k in ("linear", "conv_same"):  # as the format-1 library continued them (to the last bits of the
        # roots: the batch-independent roots of a later release round eigenvalue powers exactly)
        diff = (params[k].detach() - saved["params_after"][k]).abs().max()
        assert diff <= 1e-7, (k, float(diff))  # measured 1.3e-9: rounding amplified by the roots (κ up to 1e6)
    saved_again = opt.state_dict()
    assert saved_again["scalable_shampoo"]["format_version"] == 2
    opt.load_state_dict(saved_again)  # format 2 loads whatever the plans


def test_an_unknown_format_is_refused():
    saved, params, opt = _setup()
    saved["optimizer"]["scalable_shampoo"]["format_version"] = 0
    with pytest.raises(ValueError, match=r"format_version 0 is not one this scalable_shampoo reads \(formats 1, 2\)"):
        opt.load_state_dict(saved["optimizer"])
