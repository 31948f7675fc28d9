"""Old checkpoints keep working; newer ones are refused with a clear error.

``tests/checkpoints/`` holds one small frozen checkpoint per writer of each format,
written by ``tests/checkpoints/make_checkpoint.py``: ``format1-first.pt`` by the first
release (format 1 as first written: 5 numbers per ``root_info``, no
``root_storage_dtype``) and ``format1.pt`` by today's code. A frozen file is never
rewritten once its format is past; the file of today's format is rewritten only when
a deliberate change to the numerics makes today's writer differ from it.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from scalable_shampoo import FORMAT_VERSION, Shampoo
from scalable_shampoo.state import FORMATS, TOP_KEY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


HERE = Path(__file__).parent / "checkpoints"
FROZEN = sorted(HERE.glob("*.pt"))
_spec = importlib.util.spec_from_file_location("make_checkpoint", HERE / "make_checkpoint.py")
assert _spec is not None and _spec.loader is not None
mk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mk)


def load_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(path, weights_only=True)
    return data


def restore(data: dict[str, Any]) -> tuple[Shampoo, list[torch.nn.Parameter]]:
    """Today's optimizer, built as the writer built it, with the file's parameters and state."""
    params = [torch.nn.Parameter(p.clone()) for p in data["params"]]
    opt = Shampoo(mk.param_groups(params), **mk.settings())
    opt.load_state_dict(data["optimizer"])
    return opt, params


def written_today(opt: Shampoo) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd: dict[str, Any] = torch.load(buf, weights_only=True)
    return sd


def test_there_is_a_frozen_checkpoint_for_every_format_including_todays() -> None:
    versions = {load_file(f)["optimizer"][TOP_KEY]["format_version"] for f in FROZEN}
    assert versions == set(FORMATS), "write one with tests/checkpoints/make_checkpoint.py for each format"


@pytest.mark.parametrize("path", FROZEN, ids=[f.name for f in FROZEN])
def test_a_frozen_checkpoint_loads_and_steps_bit_for_bit_like_one_written_today(path: Path) -> None:
    data = load_file(path)
    opt, params = restore(data)
    # everything in the file arrives as it was saved: values, dtypes
    saved = data["optimizer"]["state"]
    for pid, p in enumerate(params):
        for k, v in saved[pid].items():
            got = opt.state[p][k]
            if k.startswith("root_info.") and v.numel() == 5:  # the first release's: one number added
                assert torch.equal(got[:5], v) and got.numel() == 6
            elif torch.is_tensor(v):
                assert got.dtype == v.dtype and torch.equal(got, v), k
            else:
                assert got == v, k
    assert opt.global_step == mk.STEPS and all(g["root_storage_dtype"] is None for g in opt.param_groups)
    rows = opt.diagnostics()["blocks"]
    assert rows and all(r["has_root"] and r["root_step"] == mk.STEPS for r in rows)
    # the same state as today's code writes it, loaded into another optimizer
    twin_params = [torch.nn.Parameter(p.clone()) for p in data["params"]]
    twin = Shampoo(mk.param_groups(twin_params), **mk.settings())
    twin.load_state_dict(written_today(opt))
    assert written_today(twin)[TOP_KEY]["format_version"] == FORMAT_VERSION
    for last in range(mk.STEPS + 1, mk.STEPS + 11):  # 10 steps: roots recomputed at 8, 10, 12, 14, 16
        mk.train(opt, params, last, last)
        mk.train(twin, twin_params, last, last)
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params)), f"step {last}"
    for p, q in zip(params, twin_params):
        assert opt.state[p].keys() == twin.state[q].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][k]) if torch.is_tensor(v) else v == twin.state[q][k], k
    assert opt.diagnostics() == twin.diagnostics()
    assert all(r["root_step"] == mk.STEPS + 10 for r in opt.diagnostics()["blocks"])


def test_todays_code_still_writes_its_frozen_file() -> None:
    """The file of today's format, rewritten from scratch: the same keys, shapes and dtypes,
    and the same values (to rounding: another CPU's BLAS may round differently)."""
    frozen = next(
        (load_file(f) for f in FROZEN if f.name == f"format{FORMAT_VERSION}.pt"), None
    )  # fmt: skip
    assert frozen is not None, f"no tests/checkpoints/format{FORMAT_VERSION}.pt: write it with make_checkpoint.py"
    params = mk.parameters()
    opt = Shampoo(mk.param_groups(params), **mk.settings())
    mk.train(opt, params, 1, mk.STEPS)
    fresh, old = written_today(opt), frozen["optimizer"]
    assert fresh[TOP_KEY] == old[TOP_KEY]
    defaults = Shampoo.group_defaults()  # a setting added since the file was frozen is written at its default
    assert [{k: v for k, v in g.items() if k in o} for g, o in zip(fresh["param_groups"], old["param_groups"])] == old[
        "param_groups"
    ]
    assert all(g[k] == defaults[k] for g, o in zip(fresh["param_groups"], old["param_groups"]) for k in g if k not in o)
    assert fresh["state"].keys() == old["state"].keys()
    for pid in fresh["state"]:
        assert fresh["state"][pid].keys() == old["state"][pid].keys()
        for k, v in fresh["state"][pid].items():
            if torch.is_tensor(v):
                assert v.dtype == old["state"][pid][k].dtype, k
                w = old["state"][pid][k]
                if k.startswith("root_info."):  # the residual (field 1) measures rounding itself: only its size
                    assert v[1] < 1e-4 and w[1] < 1e-4, k
                    v, w = v[torch.arange(6) != 1], w[torch.arange(6) != 1]
                torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)
            else:
                assert v == old["state"][pid][k], k
    for p, q in zip(params, frozen["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-6)


def build(params: list[torch.nn.Parameter], **kw: Any) -> Shampoo:
    """The writer's optimizer, with the settings ``kw`` changed."""
    groups = [{**g, **{k: v for k, v in kw.items() if k in g}} for g in mk.param_groups(params)]
    return Shampoo(groups, **{**mk.settings(), **kw})


def fresh_state_dict(**kw: Any) -> tuple[dict[str, Any], list[torch.nn.Parameter]]:
    params = mk.parameters()
    opt = build(params, **kw)
    mk.train(opt, params, 1, 3)
    return opt.state_dict(), params


def assert_refused_and_unchanged(sd: dict[str, Any], match: str) -> None:
    params = mk.parameters()
    opt = Shampoo(mk.param_groups(params), **mk.settings())
    mk.train(opt, params, 1, 2)
    before = written_today(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = written_today(opt)
    assert after[TOP_KEY] == before[TOP_KEY] and after["param_groups"] == before["param_groups"]
    for pid, st in before["state"].items():
        assert all(torch.equal(v, after["state"][pid][k]) if torch.is_tensor(v) else True for k, v in st.items())


def test_a_newer_format_is_refused_with_a_clear_error_and_changes_nothing() -> None:
    sd, _ = fresh_state_dict()
    sd[TOP_KEY]["format_version"] = FORMAT_VERSION + 1
    assert_refused_and_unchanged(
        sd, f"format_version {FORMAT_VERSION + 1} is newer than this scalable_shampoo reads .*newer scalable_shampoo"
    )


@pytest.mark.parametrize("version", [0, -1, "1", None, 1.0])
def test_an_unknown_or_malformed_older_format_is_refused(version: Any) -> None:
    sd, _ = fresh_state_dict()
    sd[TOP_KEY]["format_version"] = version
    match = "is not one this scalable_shampoo reads" if isinstance(version, int) else "must be an integer"
    assert_refused_and_unchanged(sd, match)


@pytest.mark.parametrize("key", sorted(Shampoo.group_defaults()))
def test_a_param_group_that_lacks_a_setting_steps_as_with_its_default(key: str) -> None:
    default = Shampoo.group_defaults()[key]
    sd, _ = fresh_state_dict(**{key: default})  # the key written at its default
    reference = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop(key, None)  # as a version written before the key existed
    runs = []
    for checkpoint in (sd, reference):
        params = mk.parameters()
        opt = build(params, **{key: default})  # settings that lay out the state must match the checkpoint's
        opt.load_state_dict(checkpoint)
        mk.train(opt, params, 4, 8)  # (a missing key raised KeyError here before defaults were filled in)
        runs.append((params, opt))
    (params, opt), (params2, opt2) = runs
    assert all(g[key] == g2[key] for g, g2 in zip(opt.param_groups, opt2.param_groups))
    assert all(torch.equal(p, q) for p, q in zip(params, params2))
    assert all(key not in g for g in sd["param_groups"])  # the caller's dict is not filled in


def test_the_first_releases_checkpoint_lacks_root_storage_dtype_and_gets_none() -> None:
    data = load_file(HERE / "format1-first.pt")
    assert all("root_storage_dtype" not in g for g in data["optimizer"]["param_groups"])
    opt, _ = restore(data)
    assert all(g["root_storage_dtype"] is None for g in opt.param_groups)


def test_the_documented_defaults_are_the_constructor_defaults_of_every_group_setting() -> None:
    opt = Shampoo(mk.parameters())
    assert set(Shampoo.group_defaults()) == set(opt.defaults) == set(opt.param_groups[0]) - {"params"}
    assert Shampoo.group_defaults()["root_storage_dtype"] is None


def test_a_bad_setting_in_a_checkpoint_is_refused_and_changes_nothing() -> None:
    sd, _ = fresh_state_dict()
    sd["param_groups"][1]["block_size"] = 0
    assert_refused_and_unchanged(sd, "bad param group setting: block_size must be an integer ≥ 1, got 0")


def test_a_plain_number_step_loads_as_a_tensor() -> None:
    sd, params = fresh_state_dict()
    for st in sd["state"].values():
        st["step"] = float(st["step"].item())  # as an old torch.optim checkpoint stores it
    opt = Shampoo(mk.param_groups(params), **mk.settings())
    opt.load_state_dict(sd)
    assert all(s["step"].dtype == torch.int64 and int(s["step"]) == 3 for s in opt.state.values())
    mk.train(opt, params, 4, 5)
    assert all(int(s["step"]) == 5 for s in opt.state.values())
