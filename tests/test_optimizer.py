import copy
import io

import pytest
import torch
from conftest import train
from torch import nn

from scalable_shampoo import FORMAT_VERSION, Shampoo, inverse_root

FAST = dict(precondition_frequency=3, start_preconditioning_step=2)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def classify(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def all_state(opt):
    return {(i, k): v for i, s in enumerate(opt.state.values()) for k, v in s.items()}


def assert_same_state(a, b):
    sa, sb = all_state(a), all_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


# ---------------------------------------------------------------- bad arguments
BAD = [
    (dict(lr=-1.0), "lr must be a number ≥ 0 or a 1-element Tensor, got -1.0"),
    (dict(lr="0.1"), "lr must be"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, 0.0)), r"betas\[1\] must be in \(0, 1\], got 0.0"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=0.0), "eps must be > 0, got 0.0"),
    (dict(weight_decay=-0.1), "weight_decay must be ≥ 0, got -0.1"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(nesterov=True), "nesterov must be False when momentum is 0"),
    (dict(grafting="adamm"), "grafting must be one of .*'adam'.*, got 'adamm'"),
    (dict(grafting_beta2=1.5), "grafting_beta2 must be None or in"),
    (dict(block_size=0), "block_size must be an integer ≥ 1, got 0"),
    (dict(block_size=-4), "block_size must be an integer ≥ 1, got -4"),
    (dict(block_size=2.5), "block_size must be an integer ≥ 1, got 2.5"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim must be an integer ≥ 1, got 0"),
    (dict(precondition_frequency=0), "precondition_frequency must be an integer ≥ 1, got 0"),
    (dict(start_preconditioning_step=0), "start_preconditioning_step must be an integer ≥ 1, got 0"),
    (dict(merge_dims_bound=0), "merge_dims_bound must be None or an integer ≥ 1, got 0"),
    (dict(exponent_override=0), "exponent_override must be None or an integer ≥ 1, got 0"),
    (dict(matrix_eps=0.0), "matrix_eps must be > 0, got 0.0"),
    (dict(matrix_eps=-1e-6), "matrix_eps must be > 0, got -1e-06"),
    (dict(root_method="cholesky"), "root_method must be one of .*, got 'cholesky'"),
    (dict(root_dtype=torch.float16), "root_dtype must be torch.float32 or torch.float64, got torch.float16"),
    (dict(max_root_residual=0), "max_root_residual must be > 0, got 0"),
    (dict(root_retries=-1), "root_retries must be an integer ≥ 0, got -1"),
    (dict(nonfinite_grad="ignore"), "nonfinite_grad must be one of 'skip', 'raise', got 'ignore'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)])
def test_bad_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shampoo([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_bad_param_group_is_not_added():
    opt = Shampoo([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="block_size"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "block_size": 0})
    assert len(opt.param_groups) == 1


def test_complex_parameters_and_sparse_gradients_are_refused():
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        Shampoo([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Shampoo(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients are not supported"):
        opt.step()


# ---------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_the_step_and_changes_nothing(bad):
    model = tiny_model()
    opt = Shampoo(model.parameters(), lr=0.01, **FAST)
    train(model, opt, batches(4), classify)  # statistics and roots exist
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    model[0].weight.grad[1, 2] = bad
    opt.step()
    assert opt.skipped_steps == 1 and opt.global_step == 4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][pid][k], v) if torch.is_tensor(v) else after["state"][pid][k] == v


def test_nonfinite_gradient_raises_when_asked():
    model = tiny_model()
    opt = Shampoo(model.parameters(), nonfinite_grad="raise")
    nn.functional.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    model[2].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite gradient in parameter 3"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert len(opt.state) == 0


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_state_dict_round_trip_continues_bit_for_bit(dtype):
    data = batches(16, dtype=dtype)
    model = tiny_model(dtype)
    opt = Shampoo(model.parameters(), lr=0.01, momentum=0.5, **FAST)
    train(model, opt, data[:7], classify)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_model(dtype, seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = Shampoo(model2.parameters(), lr=0.01, momentum=0.5, **FAST)
    opt2.load_state_dict(ckpt["opt"])

    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert opt2.state[model2[0].weight]["stat.0.0"].dtype == stat_dtype
    assert opt2.state[model2[0].weight]["step"].device.type == "cpu"
    assert_same_state(opt, opt2)
    assert opt2.global_step == 7
    train(model, opt, data[7:], classify)
    train(model2, opt2, data[7:], classify)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)


def test_state_dict_carries_format_version_and_refuses_others():
    model = tiny_model()
    opt = Shampoo(model.parameters(), **FAST)
    train(model, opt, batches(3), classify)
    sd = opt.state_dict()
    assert sd["scalable_shampoo"]["format_version"] == FORMAT_VERSION
    bad = copy.deepcopy(sd)
    bad["scalable_shampoo"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99 is newer than this scalable_shampoo reads"):
        Shampoo(model.parameters()).load_state_dict(bad)
    adam = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not saved by scalable_shampoo.Shampoo"):
        Shampoo(model.parameters()).load_state_dict(adam)


def test_state_dict_from_another_model_is_refused_and_changes_nothing():
    model = tiny_model()
    opt = Shampoo(model.parameters(), **FAST)
    train(model, opt, batches(3), classify)
    other = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt_other = Shampoo(other.parameters(), **FAST)
    train(other, opt_other, batches(2), classify)
    before = copy.deepcopy(opt_other.state_dict())
    with pytest.raises(ValueError, match="does not fit parameter 0 of shape"):
        opt_other.load_state_dict(opt.state_dict())
    assert opt_other.global_step == 2
    after = opt_other.state_dict()
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items() if torch.is_tensor(v))


# ---------------------------------------------------------------- shapes, dtypes, groups
@pytest.mark.parametrize(
    "shape", [(), (7,), (1, 9), (5, 4), (3, 3, 2, 2), (2, 3, 4, 5, 2), (0, 3), (9, 1, 4)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_order_and_dtype_trains_to_finite_values(shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype).requires_grad_()
    opt = Shampoo([w], lr=0.01, block_size=3, precondition_1d=True, **FAST)
    for _ in range(6):
        w.grad = torch.randn(shape).to(dtype)
        opt.step()
    assert w.dtype == dtype and torch.isfinite(w).all()
    for k, v in opt.state[w].items():
        if k.startswith(("stat.", "root.")):
            assert v.dtype == torch.float32


def test_embedding_is_preconditioned_on_one_side():
    emb = nn.Embedding(300, 8)
    opt = Shampoo(emb.parameters(), max_preconditioner_dim=256, **FAST)
    for _ in range(3):
        opt.zero_grad()
        emb(torch.randint(0, 300, (32,))).pow(2).sum().backward()
        opt.step()
    keys = {k for k in opt.state[emb.weight] if k.startswith(("stat.", "root."))}
    assert keys == {"stat.0.1", "root.0.1"}
    assert opt.state[emb.weight]["stat.0.1"].shape == (8, 8)


def test_vectors_get_grafting_alone_unless_asked():
    b = torch.zeros(10, requires_grad=True)
    opt = Shampoo([b], **FAST)
    b.grad = torch.ones(10)
    opt.step()
    assert not any(k.startswith("stat.") for k in opt.state[b])
    opt = Shampoo([b], precondition_1d=True, **FAST)
    b.grad = torch.ones(10)
    opt.step()
    assert opt.state[b]["stat.0.0"].shape == (10, 10)


def test_roots_are_recomputed_on_schedule_and_exponent_override_is_used():
    w = torch.randn(4, 4, requires_grad=True)
    opt = Shampoo([w], precondition_frequency=3, start_preconditioning_step=2, exponent_override=2)
    computed, snapshot = [], None
    for step in range(1, 10):
        w.grad = torch.randn(4, 4)
        opt.step()
        info = opt.state[w].get("root_info.0.0")
        computed.append(int(info[0]) if info is not None else None)
        if step == 8:
            snapshot = opt.state[w]["stat.0.0"].clone()
    assert computed == [None, 2, 2, 2, 5, 5, 5, 8, 8]
    # the installed root is the one of the statistic as it was at step 8, with p = 2
    expected = inverse_root(snapshot, 2, eps=1e-6, method="eigh")
    torch.testing.assert_close(opt.state[w]["root.0.0"], expected.root)
    assert float(opt.state[w]["root_info.0.0"][3]) == pytest.approx(float(expected.eps))
    assert opt.state[w]["root_method.0.0"] == "eigh/fp32"


def test_a_rejected_root_keeps_the_previous_one_and_is_counted():
    w = torch.randn(5, 5, requires_grad=True)
    opt = Shampoo([w], precondition_frequency=2, start_preconditioning_step=1)
    w.grad = torch.randn(5, 5)
    opt.step()
    first = opt.state[w]["root.0.0"].clone()
    opt.param_groups[0]["max_root_residual"] = 1e-300
    opt.param_groups[0]["root_retries"] = 0
    for _ in range(4):
        w.grad = torch.randn(5, 5)
        opt.step()
    assert torch.equal(opt.state[w]["root.0.0"], first)
    assert float(opt.state[w]["root_info.0.0"][4]) == 2  # rejected at steps 3 and 5
    assert torch.isfinite(w).all()


def test_param_groups_and_lr_scheduler():
    model = tiny_model()
    opt = Shampoo(
        [
            {"params": model[0].parameters(), "lr": 0.1, "block_size": 4},
            {"params": model[2].parameters(), "grafting": "sgd", "betas": (0.0, 1.0)},
        ],
        lr=0.01,
        **FAST,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0025)
    assert "stat.5.1" in opt.state[model[0].weight]  # 12×6 in blocks of 4: 3×2 blocks


def test_parameters_without_gradients_are_left_alone():
    model = tiny_model()
    opt = Shampoo(model.parameters(), **FAST)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad = None
    before = model[2].weight.detach().clone()
    opt.step()
    assert torch.equal(model[2].weight, before)
    assert model[2].weight not in opt.state


def test_closure_is_called_and_its_loss_returned():
    model = tiny_model()
    opt = Shampoo(model.parameters())
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss > 0


def test_shampoo_trains_a_real_model_faster_than_its_grafting_alone():
    # A least-squares problem with correlated, badly scaled inputs: curvature pays.
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(20, 20, generator=g) * torch.logspace(0, -2, 20)
    x = torch.randn(512, 20, generator=g) @ mix
    target = x @ torch.randn(20, 5, generator=g)

    def final_loss(opt_factory):
        torch.manual_seed(0)
        lin = nn.Linear(20, 5, bias=False)
        opt = opt_factory(lin.parameters())
        for _ in range(100):
            opt.zero_grad()
            loss = (lin(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
        return loss.item()

    adam = final_loss(lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0))
    shampoo = final_loss(
        lambda ps: Shampoo(ps, lr=0.05, weight_decay=0, precondition_frequency=5, start_preconditioning_step=5)
    )
    assert shampoo < 0.5 * adam, (shampoo, adam)


@pytest.mark.parametrize("batched", [True, False])
def test_memory_report_counts_each_kind(batched):
    w = torch.zeros(64, 32, requires_grad=True)
    b = torch.zeros(32, requires_grad=True)
    opt = Shampoo([w, b], momentum=0.9, block_size=32, batched=batched, **FAST)
    for _ in range(3):
        w.grad, b.grad = torch.randn(64, 32), torch.randn(32)
        opt.step()
    m = opt.memory()
    assert m["parameters"] == (64 * 32 + 32) * 4
    assert m["statistics"] == 2 * 2 * 32 * 32 * 4  # 2 blocks of 32×32, two 32×32 factors each
    assert m["roots"] == m["statistics"]  # every block has its roots
    assert m["first_moment"] == m["grafting"] == m["momentum"] == m["parameters"]
    # three chunk buffers (x, d, mid) shared by every bucket: both blocks in one chunk when batched
    assert m["scratch"] == 3 * (2 if batched else 1) * 32 * 32 * 4


def test_a_zero_statistic_gets_no_root_and_is_not_counted_as_rejected():
    """Rows of an embedding never looked up: their block's statistic stays zero."""
    emb = torch.nn.Embedding(40, 4)
    opt = Shampoo(emb.parameters(), block_size=8, precondition_frequency=2, start_preconditioning_step=1)
    before = emb.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        emb(torch.tensor([0, 3, 5])).pow(2).sum().backward()  # rows 0-7 only: block 0 of 5
        opt.step()
    state = opt.state[emb.weight]
    assert "root.0.0" in state and "root.1.0" not in state  # block 1 (rows 8-15) never had a gradient
    assert float(state["root_info.1.0"][2]) == 0 and float(state["root_info.1.0"][4]) == 0  # λ_max 0, not rejected
    expected = before[8:]
    for _ in range(4):
        expected = expected * (1 - 1e-3 * 1e-2)  # W ← W(1 − lr·λ): only weight decay moved them
    assert torch.equal(emb.weight[8:].detach(), expected)
