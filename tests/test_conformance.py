"""What PyTorch's generic optimizer suite checks of every ``torch.optim`` optimizer,
checked here for Shampoo with its preconditioner active (roots from step 1, small
blocks): the loss goes down (with and without an LR scheduler), param groups and
adding one mid-run, zero and absent gradients, closures, ``repr``, state-dict
determinism and a ``weights_only=True`` load, every optimizer hook, and the errors.
Copies and pickles: ``test_copy_pickle.py``; Tensor lr: ``test_tensor_lr.py``; older
and newer checkpoints: ``test_checkpoint_formats.py``.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from scalable_shampoo import Shampoo
from scalable_shampoo.state import TOP_KEY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


ACTIVE = dict(block_size=4, start_preconditioning_step=1, precondition_frequency=2)


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step % 4)  # four batches, cycled
    x = torch.randn(32, 6, generator=gen)
    return x, torch.sin(x[:, :3]) + 0.5 * x[:, 3:]


def loss_of(m: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return (m(x) - y).pow(2).mean()


def train(m: nn.Module, opts: list[torch.optim.Optimizer], first: int, last: int, sched: Any = None) -> list[float]:
    losses = []
    for step in range(first, last + 1):
        for o in opts:
            o.zero_grad()
        loss = loss_of(m, step)
        loss.backward()
        for o in opts:
            o.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def preconditioned(opt: Shampoo) -> bool:
    rows = opt.diagnostics()["blocks"]
    return bool(rows) and all(r["has_root"] for r in rows)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- the loss goes down
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any] | None] = {
    "none": None,
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=10, gamma=0.5),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=40),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=3e-2, total_steps=40),
    "ReduceLROnPlateau": None,  # stepped with the loss, below
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_loss_goes_down(schedule: str) -> None:
    m = model()
    opt = Shampoo(m.parameters(), lr=1e-2, **ACTIVE)
    make = SCHEDULES[schedule]
    sched = make(opt) if make is not None else None
    if schedule == "ReduceLROnPlateau":
        plateau = lr_scheduler.ReduceLROnPlateau(opt, patience=2)
        losses = []
        for step in range(1, 41):
            losses += train(m, [opt], step, step)
            plateau.step(losses[-1])
    else:
        losses = train(m, [opt], 1, 40, sched)
    assert preconditioned(opt)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses


# ---------------------------------------------------------------- param groups
def test_each_param_group_steps_with_its_own_settings() -> None:
    a, b = model(), model()
    groups = [
        {"params": a[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
        {"params": a[2].parameters(), "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99), "momentum": 0.5},
    ]
    together = Shampoo(groups, **ACTIVE)
    apart = [
        Shampoo(b[0].parameters(), lr=1e-2, weight_decay=0.1, **ACTIVE),
        Shampoo(b[2].parameters(), lr=3e-3, weight_decay=0.0, betas=(0.8, 0.99), momentum=0.5, **ACTIVE),
    ]
    for step in range(1, 13):
        train(a, [together], step, step)
        train(b, apart, step, step)
        assert same_params(a, b), f"step {step}"
    assert preconditioned(together)


def test_a_group_with_lr_zero_and_no_weight_decay_does_not_move() -> None:
    m = model()
    frozen = [p.detach().clone() for p in m[2].parameters()]
    opt = Shampoo([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.0}], lr=1e-2,
                  weight_decay=0.0, **ACTIVE)  # fmt: skip
    train(m, [opt], 1, 6)
    assert all(torch.equal(p, q) for p, q in zip(m[2].parameters(), frozen))
    assert not torch.equal(m[0].weight, model()[0].weight)


def test_adding_a_param_group_mid_run_is_the_same_as_a_second_optimizer_from_then() -> None:
    a, b = model(), model()
    opt = Shampoo(a[0].parameters(), lr=1e-2, **ACTIVE)
    first = Shampoo(b[0].parameters(), lr=1e-2, **ACTIVE)
    train(a, [opt], 1, 5)
    train(b, [first], 1, 5)  # (the second layer is not stepped yet in either)
    opt.add_param_group({"params": list(a[2].parameters()), "lr": 3e-3, "momentum": 0.5})
    second = Shampoo(b[2].parameters(), lr=3e-3, momentum=0.5, **ACTIVE)
    assert opt.param_groups[1]["block_size"] == 4  # the new group takes the optimizer's defaults
    for step in range(6, 16):
        train(a, [opt], step, step)
        train(b, [first, second], step, step)
        assert same_params(a, b), f"step {step}"
    assert preconditioned(opt) and int(opt.state[a[2].weight]["step"]) == 10


# ---------------------------------------------------------------- zero and absent gradients
def test_zero_gradients_leave_weights_alone_without_weight_decay() -> None:
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = Shampoo(m.parameters(), weight_decay=0.0, **ACTIVE)
    for _ in range(5):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(int(s["step"]) == 5 for s in opt.state.values())


def test_weight_decay_decays_weights_with_zero_gradient_exactly_as_adamw() -> None:
    a, b = model(), model()
    opt = Shampoo(a.parameters(), lr=1e-2, weight_decay=0.1, **ACTIVE)
    adamw = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
        opt.step()
        adamw.step()
        assert same_params(a, b)
    assert not same_params(a, model())  # they did decay: W ← W(1 − lr·λ) at every step


def test_parameters_without_gradients_are_not_touched() -> None:
    m = model()
    before = copy.deepcopy(m)
    opt = Shampoo(m.parameters(), lr=1e-2, **ACTIVE)
    for p in m.parameters():
        p.grad = None
    opt.step()  # no gradient at all: a no-op
    assert same_params(m, before) and len(opt.state) == 0
    for step in range(1, 6):  # gradients for the first layer only
        opt.zero_grad()
        loss_of(m, step).backward()
        for p in m[2].parameters():
            p.grad = None
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m[2].parameters(), before[2].parameters()))
    assert all(p not in opt.state for p in m[2].parameters()) and m[0].weight in opt.state


# ---------------------------------------------------------------- closures
def test_a_closure_is_called_once_per_step_with_grad_enabled_and_its_loss_returned() -> None:
    a, b = model(), model()
    opt_a, opt_b = Shampoo(a.parameters(), lr=1e-2, **ACTIVE), Shampoo(b.parameters(), lr=1e-2, **ACTIVE)
    calls = []
    for step in range(1, 9):

        def closure(step: int = step) -> torch.Tensor:
            calls.append(torch.is_grad_enabled())
            opt_a.zero_grad()
            loss = loss_of(a, step)
            loss.backward()
            return loss

        returned = opt_a.step(closure)
        expected = train(b, [opt_b], step, step)[0]
        assert isinstance(returned, torch.Tensor) and returned.item() == expected
        assert same_params(a, b)
    assert calls == [True] * 8 and preconditioned(opt_a)
    assert opt_a.step() is None  # no closure: returns None, as torch.optim


# ---------------------------------------------------------------- repr
def test_repr_lists_every_group_and_setting() -> None:
    m = model()
    opt = Shampoo([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 3e-3}],
                  lr=torch.tensor(1e-2), **ACTIVE)  # fmt: skip
    text = repr(opt)
    assert text.startswith("Shampoo (") and text.endswith(")")
    assert "Parameter Group 0" in text and "Parameter Group 1" in text
    for key in Shampoo.group_defaults():
        assert text.count(f"    {key}: ") == 2, key
    assert "    lr: 0.003\n" in text and "    block_size: 4\n" in text
    assert f"    lr: {torch.tensor(1e-2).item()}\n" in text  # a 0-dim Tensor lr prints as the float it holds


# ---------------------------------------------------------------- state dicts
def trained(seed_steps: int = 7) -> tuple[nn.Module, Shampoo]:
    m = model()
    opt = Shampoo(m.parameters(), lr=1e-2, momentum=0.5, **ACTIVE)
    train(m, [opt], 1, seed_steps)
    return m, opt


def assert_same_state_dict(x: dict[str, Any], y: dict[str, Any]) -> None:
    assert x.keys() == y.keys() and x["param_groups"] == y["param_groups"] and x[TOP_KEY] == y[TOP_KEY]
    assert x["state"].keys() == y["state"].keys()
    for pid in x["state"]:
        assert list(x["state"][pid]) == list(y["state"][pid])  # the same keys in the same order
        for k, v in x["state"][pid].items():
            w = y["state"][pid][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, k


def test_state_dict_is_deterministic() -> None:
    (_, a), (_, b) = trained(), trained()
    assert_same_state_dict(a.state_dict(), b.state_dict())  # the same run, the same state dict
    assert_same_state_dict(a.state_dict(), a.state_dict())  # asking twice changes nothing
    m = model(seed=5)
    c = Shampoo(m.parameters(), lr=1e-2, momentum=0.5, **ACTIVE)
    c.load_state_dict(a.state_dict())
    assert_same_state_dict(c.state_dict(), a.state_dict())  # loaded, then saved: the same


def test_a_weights_only_load_continues_bit_for_bit() -> None:
    m, opt = trained()
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = model(seed=9)
    m2.load_state_dict(ckpt["model"])
    opt2 = Shampoo(m2.parameters(), lr=1e-2, momentum=0.5, **ACTIVE)
    opt2.load_state_dict(ckpt["opt"])
    assert_same_state_dict(opt2.state_dict(), opt.state_dict())
    for step in range(8, 18):
        train(m, [opt], step, step)
        train(m2, [opt2], step, step)
        assert same_params(m, m2), f"step {step}"


def test_named_parameters_are_taken_and_step_like_unnamed_ones() -> None:
    a, b = model(), model()
    named = Shampoo(a.named_parameters(), lr=1e-2, **ACTIVE)
    plain = Shampoo(b.parameters(), lr=1e-2, **ACTIVE)
    train(a, [named], 1, 6)
    train(b, [plain], 1, 6)
    assert same_params(a, b)
    assert named.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in a.named_parameters()]


# ---------------------------------------------------------------- hooks
def test_step_pre_and_post_hooks_run_around_the_step_and_can_be_removed() -> None:
    m, opt = trained(2)
    seen: list[tuple[str, int]] = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.global_step)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.global_step)))
    glob_pre = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("global pre", o.global_step)))
    glob_post = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("global post", o.global_step)))
    try:
        train(m, [opt], 3, 3)
    finally:
        glob_pre.remove()
        glob_post.remove()
    assert seen == [("global pre", 2), ("pre", 2), ("post", 3), ("global post", 3)]
    pre.remove()
    post.remove()
    train(m, [opt], 4, 4)
    assert len(seen) == 4


def test_a_step_pre_hook_can_replace_the_closure() -> None:
    m, opt = trained(2)
    calls = []

    def closure() -> torch.Tensor:
        calls.append("replacement")
        opt.zero_grad()
        loss = loss_of(m, 3)
        loss.backward()
        return loss

    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, closure), kwargs))  # args start with the optimizer
    loss = opt.step(lambda: pytest.fail("the hook replaced this closure"))
    assert calls == ["replacement"] and isinstance(loss, torch.Tensor)


def test_state_dict_pre_and_post_hooks() -> None:
    _, opt = trained(3)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o.global_step)))

    def post(o: Shampoo, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append(("post", sd[TOP_KEY]["global_step"]))  # after the library's own hook
        return {**sd, "note": "from a hook"}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == [("pre", 3), ("post", 3)] and sd["note"] == "from a hook"
    first = []
    opt.register_state_dict_post_hook(lambda o, sd: first.append(TOP_KEY in sd), prepend=True)
    opt.state_dict()
    assert first == [False]  # a prepended hook runs before the library's


def test_load_state_dict_pre_and_post_hooks() -> None:
    _, source = trained(4)
    m = model(seed=3)
    opt = Shampoo(m.parameters(), lr=1e-2, momentum=0.5, **ACTIVE)
    seen = []

    def pre(o: Shampoo, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append(("pre", o.global_step))
        sd = copy.copy(sd)
        sd["param_groups"] = [{**g, "lr": 5e-3} for g in sd["param_groups"]]  # a user's rewrite
        return sd

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("post", o.global_step)))
    opt.load_state_dict(source.state_dict())
    assert seen == [("pre", 0), ("post", 4)]
    assert opt.param_groups[0]["lr"] == 5e-3 and source.param_groups[0]["lr"] == 1e-2
    train(m, [opt], 5, 6)


# ---------------------------------------------------------------- errors
BAD_ARGUMENTS: list[tuple[str, Any]] = [
    ("lr", -1.0), ("lr", "0.1"), ("lr", torch.tensor([1e-3, 1e-3])), ("betas", (1.0, 0.9)), ("betas", (0.9, 0.0)),
    ("betas", 0.9), ("eps", 0.0), ("weight_decay", -0.1), ("decoupled_weight_decay", "yes"), ("momentum", 1.0),
    ("nesterov", True), ("nesterov", 1), ("grafting", "adamm"), ("grafting_beta2", 1.5), ("block_size", 0),
    ("max_preconditioner_dim", 2.5), ("merge_dims_bound", 0), ("precondition_1d", None), ("exponent_override", 0),
    ("precondition_frequency", 0), ("start_preconditioning_step", -1), ("matrix_eps", 0.0),
    ("matrix_eps_relative", "no"), ("root_method", "cholesky"), ("root_dtype", torch.float16),
    ("root_storage_dtype", torch.int8), ("max_root_residual", 0), ("root_retries", -1), ("nonfinite_grad", "ignore"),
    ("scheduler", "inline"), ("batched", 1), ("compile_elementwise", "yes"), ("communication_dtype", torch.int8),
    ("precondition_axes", "x"), ("preconditioner", "soap"),
    ("first_moment_basis", "eigen"), ("fsdp", "sharded"), ("basis_refresh", "power"), ("packed_storage", "yes"),
]  # fmt: skip


def test_every_argument_is_covered_by_a_bad_value() -> None:
    import inspect

    names = set(inspect.signature(Shampoo.__init__).parameters) - {"self", "params", "process_group"}
    assert names == {name for name, _ in BAD_ARGUMENTS}


@pytest.mark.parametrize("name,value", BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_a_bad_argument_is_named_before_the_params_are_read(name: str, value: Any) -> None:
    if torch.is_tensor(value):
        pattern = "Tensor lr must be 1-element"
    elif name == "betas" and isinstance(value, tuple):  # the bad element is named
        i = 0 if value[0] >= 1 else 1
        pattern = re.escape(f"betas[{i}] must be ") + ".*" + re.escape(f", got {value[i]!r}")
    else:
        pattern = re.escape(f"{name} must be ") + ".*" + re.escape(f", got {value!r}")
    for params in (None, iter([]), model().parameters()):  # params are not read before the arguments are checked
        with pytest.raises(ValueError, match=pattern):
            Shampoo(params, **{name: value})  # type: ignore[arg-type]


def test_params_errors_as_torch_optim() -> None:
    w = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        Shampoo(w)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not iterable"):
        Shampoo(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        Shampoo([])
    with pytest.raises(ValueError, match="already in this group"):  # torch only warns; listed twice, w would
        Shampoo([w, w])  # be stepped twice, so Shampoo refuses it
    with pytest.raises(ValueError, match="is already in param group 0"):  # torch's error, naming the places
        Shampoo([{"params": [w]}, {"params": [w]}])
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        Shampoo([("w", w), nn.Parameter(torch.randn(2))])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        Shampoo([w * 2])
