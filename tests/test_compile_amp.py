"""Shampoo with torch.compile and mixed precision (``examples/compile_and_amp.py``)."""

import torch
from example_loader import assert_bitwise, load, one_thread  # noqa: F401 (autouse fixture)

ex = load("compile_and_amp")
STEPS = 8


def stats(opt):
    return [v for s in opt.state.values() for k, v in s.items() if k.startswith("stat.")]


def test_compiled_model_trains_like_the_eager_one():
    _, eager_opt, eager = ex.train("eager", STEPS, layers=1)
    model, opt, compiled = ex.train("compile", STEPS, layers=1)
    assert opt.global_step == STEPS and any(r["has_root"] for r in opt.diagnostics()["blocks"])
    # Shampoo steps the compiled model's own parameters: the eager module's, shared
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=0)
    assert compiled.losses[-1] < compiled.losses[0] - 0.5


def test_bf16_autocast_trains_with_fp32_statistics():
    _, _, fp32 = ex.train("eager", STEPS)
    _, opt, run = ex.train("bf16-autocast", STEPS)
    assert all(s.dtype == torch.float32 for s in stats(opt)) and stats(opt)
    assert any(r["has_root"] for r in opt.diagnostics()["blocks"])
    assert run.losses[-1] < run.losses[0] - 0.5
    # bf16 matmuls change the numbers, not the training: within 2% of fp32 at every step
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(fp32.losses), rtol=2e-2, atol=0)
    assert run.losses != fp32.losses  # autocast was really on


def test_grad_scaler_skipped_steps_touch_no_optimizer_state():
    """fp16 autocast with GradScaler, started at a scale that overflows fp16: the scaler skips
    steps until its scale is low enough. A skipped step must leave every statistic, moment and
    weight as it was, and Shampoo must not count it again (it never sees the inf gradients)."""
    for policy in ("skip", "raise"):  # "raise" never fires: the scaler does not call step() on infs
        model, opt, run = ex.train("fp16-scaler", STEPS + 4, init_scale=2.0**22, keep_states=True,
                                   nonfinite_grad=policy)  # fmt: skip
        skipped = [after < before for before, after in zip(run.scales, [*run.scales[1:], run.scales[-1]])]
        assert 1 <= sum(skipped) <= STEPS, skipped  # some skipped, and the scaler recovered
        assert not skipped[-1]
        assert skipped[0] and run.states[0]["state"] == {}  # the first step overflowed: no state was created
        previous = run.states[0]
        for k, skip in enumerate(skipped):
            state = run.states[k]
            if skip:
                assert_bitwise(state, previous, allow_empty=True)
            else:
                assert state["scalable_shampoo"]["global_step"] == previous["scalable_shampoo"]["global_step"] + 1
            previous = state
        applied = len(skipped) - sum(skipped)
        print(f"{policy}: the scaler skipped {sum(skipped)} of {len(skipped)} steps")
        assert opt.global_step == applied  # Shampoo's t (bias correction, root schedule) counts applied steps
        assert opt.skipped_steps == 0  # the scaler's skips are not counted twice
        assert all(int(s["step"]) == applied for s in opt.state.values())
        assert any(r["has_root"] for r in opt.diagnostics()["blocks"])
        assert run.losses[-1] < run.losses[0] - 0.3


def test_skipped_steps_before_any_step_leave_the_state_empty():
    _, opt, run = ex.train("fp16-scaler", 2, init_scale=2.0**40, keep_states=True)
    assert run.scales[1] < run.scales[0]  # both overflowed
    assert opt.global_step == 0 and not opt.state and run.states[0]["state"] == {}


def test_bf16_parameters_train_with_fp32_statistics_and_resume_bit_for_bit(tmp_path):
    model, opt, run = ex.train("bf16-params", STEPS)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s.dtype == torch.float32 for s in stats(opt)) and stats(opt)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k == "exp_avg")
    assert any(r["has_root"] for r in opt.diagnostics()["blocks"])
    assert run.losses[-1] < run.losses[0] - 0.5
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = ex.make_optimizer(model.parameters())
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert_bitwise(fresh.state_dict()["state"], opt.state_dict()["state"])  # fp32 statistics stay fp32
