"""Bad input in the middle of training: the optimizer keeps working and never corrupts state."""

import copy

import pytest
import torch
from torch import nn

from scalable_shampoo import Shampoo

FAST = dict(precondition_frequency=2, start_preconditioning_step=2)


def setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    return model, Shampoo(model.parameters(), lr=1e-2, **{**FAST, **kw})


def step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(8, 5, generator=g)).pow(2).mean().backward()
    opt.step()


def finite(model, opt):
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for s in opt.state.values():
        for k, v in s.items():
            if torch.is_tensor(v) and not k.startswith("root_info"):
                assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("where", ["everywhere", "one entry", "one parameter"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_anywhere_skips_the_step(where, value):
    model, opt = setup()
    for i in range(3):
        step(model, opt, i)
    before = [p.detach().clone() for p in model.parameters()]
    step_before = opt.global_step
    opt.zero_grad()
    model(torch.randn(8, 5)).pow(2).mean().backward()
    if where == "everywhere":
        for p in model.parameters():
            p.grad.fill_(value)
    elif where == "one entry":
        model[0].weight.grad[0, 0] = value
    else:
        model[2].bias.grad.fill_(value)
    opt.step()
    assert opt.skipped_steps == 1 and opt.global_step == step_before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    step(model, opt, 9)  # and training goes on
    finite(model, opt)


def test_all_zero_gradients():
    model, opt = setup(weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(6):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not any(r["has_root"] for r in opt.diagnostics()["blocks"])  # nothing to invert
    step(model, opt)
    finite(model, opt)


def test_hyperparameters_changed_mid_run():
    model, opt = setup()
    for i in range(3):
        step(model, opt, i)
    changes = [
        dict(lr=3e-3), dict(betas=(0.0, 0.99)), dict(grafting="sgd"), dict(momentum=0.9, nesterov=True),
        dict(weight_decay=0.0), dict(precondition_frequency=1), dict(grafting="normalized_rmsprop"),
        dict(betas=(0.95, 1.0)), dict(root_method="newton"), dict(root_dtype=torch.float64),
    ]  # fmt: skip
    for i, change in enumerate(changes):
        opt.param_groups[0].update(change)
        step(model, opt, 10 + i)
        finite(model, opt)
    assert "momentum_buffer" in opt.state[model[0].weight]


def test_add_param_group_mid_run():
    model, opt = setup()
    step(model, opt)
    extra = nn.Linear(2, 3)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.1})
    for i in range(4):
        opt.zero_grad()
        extra(model(torch.randn(8, 5, generator=torch.Generator().manual_seed(i)))).pow(2).mean().backward()
        opt.step()
    assert int(opt.state[extra.weight]["step"]) == 4
    assert "root.0.0" in opt.state[extra.weight]
    finite(model, opt)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda sd: sd.pop("scalable_shampoo"), "not saved by scalable_shampoo"),
        (lambda sd: sd["state"][0].pop("stat.0.1"), "missing 'stat.0.1' for parameter 0"),
        (lambda sd: sd["state"][0].pop("step"), "missing 'step' for parameter 0"),
        (lambda sd: sd["param_groups"].pop(), "different param groups"),
        (lambda sd: sd["state"][2].update(exp_avg=torch.zeros(3)), "exp_avg has shape"),
    ],
    ids=["no-version", "no-stat", "no-step", "groups", "bad-shape"],
)
def test_damaged_state_dict_is_refused_and_changes_nothing(damage, message):
    model, opt = setup()
    for i in range(3):
        step(model, opt, i)
    sd = copy.deepcopy(opt.state_dict())
    damage(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for pid, s in before["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][pid][k], v) if torch.is_tensor(v) else after["state"][pid][k] == v


def test_step_without_any_gradient_is_a_no_op():
    model, opt = setup()
    opt.step()
    assert opt.global_step == 1 and len(opt.state) == 0


# ---------------------------------------------------------------------- placement and duplicates
@pytest.mark.parametrize("batched", [True, False])
def test_a_parameter_cast_after_the_optimizer_was_built_is_refused(batched):
    model, opt = setup(batched=batched)
    for i in range(3):
        step(model, opt, i)
    state = copy.deepcopy(opt.state_dict())
    model.double()  # the same Parameter objects, now float64
    opt.zero_grad()
    model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(7, 5\)\) is now torch.float64 on cpu, but its "
                                         r"optimizer state was created for torch.float32 on cpu"):
        opt.step()
    after = opt.state_dict()
    assert opt.global_step == 3
    assert after["state"][0].keys() == state["state"][0].keys()
    for k, v in state["state"][0].items():  # nothing was changed
        assert torch.equal(after["state"][0][k], v) if torch.is_tensor(v) else after["state"][0][k] == v, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_parameter_moved_to_another_device_after_the_optimizer_was_built_is_refused():
    model, opt = setup()
    for i in range(3):
        step(model, opt, i)
    model.to("cuda")
    opt.zero_grad()
    model(torch.randn(8, 5, device="cuda")).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(7, 5\)\) is now torch.float32 on cuda:0, but its "
                                         r"optimizer state was created for torch.float32 on cpu"):
        opt.step()


def test_a_fresh_optimizer_after_the_cast_trains():
    model, opt = setup()
    step(model, opt)
    model.double()
    opt = Shampoo(model.parameters(), lr=1e-2, **FAST)  # built after the cast: fine
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
    assert opt.state[model[0].weight]["stat.0.0"].dtype == torch.float64
    finite(model, opt)


def test_the_same_tensor_in_two_param_groups_is_refused():
    model = nn.Linear(3, 2)
    w = model.weight
    with pytest.raises(ValueError, match=r"params: the tensor at position 0 of param group 1 \(shape \(2, 3\)\) "
                                         r"is already in param group 0, position 0"):
        Shampoo([{"params": [w, model.bias]}, {"params": [w], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"position 2 of param group 0 \(shape \(2, 3\)\) is already in this "
                                         r"group, position 0"):
        Shampoo([w, model.bias, w])
    opt = Shampoo([w])
    with pytest.raises(ValueError, match=r"position 1 of param group 1 .* already in param group 0, position 0"):
        opt.add_param_group({"params": iter([model.bias, w])})
    assert len(opt.param_groups) == 1  # refused before anything was added
    opt.add_param_group({"params": iter([model.bias])})  # a generator is taken whole
    assert opt.param_groups[1]["params"] == [model.bias]


def test_a_cast_before_the_first_step_is_fine():
    model, opt = setup()
    for p in model.parameters():  # a skipped step (NaN gradients) creates no state
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    model.double()  # no state exists yet: it is created for float64 at the first step
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
    assert opt.state[model[0].weight]["stat.0.0"].dtype == torch.float64
    finite(model, opt)
