"""Fan-in grouping of PyTorch layer shapes, the per-group ``precondition_axes``, the
``param_groups_for`` helper and ``Shampoo.plan_table``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalable_shampoo import Shampoo, param_groups_for

# layer → (its weight's shape, merged shape, the weight's dims in each merged axis), under the
# default bound (block_size 1024); written out by hand from PyTorch's layouts
LAYERS = {
    "Linear(32, 16)": (nn.Linear(32, 16), (16, 32), (16, 32), ((0,), (1,))),
    "Linear(2048, 8)": (nn.Linear(2048, 8), (8, 2048), (8, 2048), ((0,), (1,))),
    "Conv1d(8, 16, 5)": (nn.Conv1d(8, 16, 5), (16, 8, 5), (16, 40), ((0,), (1, 2))),
    "Conv2d(3, 16, 3)": (nn.Conv2d(3, 16, 3), (16, 3, 3, 3), (16, 27), ((0,), (1, 2, 3))),
    "Conv2d(16, 32, 3)": (nn.Conv2d(16, 32, 3), (32, 16, 3, 3), (32, 144), ((0,), (1, 2, 3))),
    "Conv2d(4, 4, 3)": (nn.Conv2d(4, 4, 3), (4, 4, 3, 3), (4, 36), ((0,), (1, 2, 3))),
    "Conv2d(256, 128, 3)": (nn.Conv2d(256, 128, 3), (128, 256, 3, 3), (128, 256, 9), ((0,), (1,), (2, 3))),
    "Conv2d(64, 64, (1, 7))": (nn.Conv2d(64, 64, (1, 7)), (64, 64, 1, 7), (64, 448), ((0,), (1, 3))),
    "Conv3d(4, 8, 3)": (nn.Conv3d(4, 8, 3), (8, 4, 3, 3, 3), (8, 108), ((0,), (1, 2, 3, 4))),
    "ConvTranspose2d(16, 32, 3)": (nn.ConvTranspose2d(16, 32, 3), (16, 32, 3, 3), (16, 288), ((0,), (1, 2, 3))),
    "ConvTranspose2d(64, 8, 4, groups=4)": (
        nn.ConvTranspose2d(64, 8, 4, groups=4), (64, 2, 4, 4), (64, 32), ((0,), (1, 2, 3))
    ),
    "depthwise Conv2d(32, 32, 3, groups=32)": (nn.Conv2d(32, 32, 3, groups=32), (32, 1, 3, 3), (32, 9), ((0,), (2, 3))),
    "grouped Conv2d(32, 64, 3, groups=4)": (nn.Conv2d(32, 64, 3, groups=4), (64, 8, 3, 3), (64, 72), ((0,), (1, 2, 3))),
    "Embedding(1000, 32)": (nn.Embedding(1000, 32), (1000, 32), (1000, 32), ((0,), (1,))),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_pytorch_layer_shapes_merge_by_fan_in(name):
    layer, shape, merged, groups = LAYERS[name]
    w = layer.weight
    assert tuple(w.shape) == shape
    plan = Shampoo.plan(w, Shampoo([w]).param_groups[0])
    assert plan.merged == merged and plan.groups == groups
    assert all(b.axes == tuple(range(len(merged))) for b in plan.blocks)  # every axis ≤ 1024 keeps statistics


def test_embedding_table_via_the_helper_keeps_only_its_d_side():
    model = nn.ModuleDict(dict(emb=nn.Embedding(1000, 32), bag=nn.EmbeddingBag(50, 8), out=nn.Linear(32, 4)))
    opt = Shampoo(param_groups_for(model))
    rows = {r["name"]: r for r in opt.plan_table(model).rows}
    assert rows["emb.weight"]["preconditioned"] == [(1,)] and rows["emb.weight"]["statistic_sizes"] == [(32, 1)]
    assert rows["bag.weight"]["preconditioned"] == [(1,)]
    assert rows["out.weight"]["preconditioned"] == [(0,), (1,)]
    assert rows["out.bias"]["preconditioned"] == []


def _kernel_grads(steps, seed=0):
    """fp64 gradients of a Conv2d(3, 6, 3) kernel from real convolutions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out = []
    for _ in range(steps):
        x = torch.randn(4, 3, 7, 7, dtype=torch.float64, generator=g)
        target = torch.randn(4, 6, 5, 5, dtype=torch.float64, generator=g)
        (grad,) = torch.autograd.grad(F.mse_loss(F.conv2d(x, w), target), w)
        out.append(grad)
    return w.detach(), out


@pytest.mark.parametrize("batched", [True, False])
def test_conv_kernel_equals_the_kronecker_reference_of_its_im2col_matrix(batched):
    """Shampoo on a [6, 3, 3, 3] kernel is (L^(-1/4) ⊗ R^(-1/4)) vec(Ĝ), grafted to Adam's
    norm, where L and R are the factors of the [out, in·kh·kw] = [6, 27] gradient matrix."""
    w0, grads = _kernel_grads(8)
    lr, b1, b2, eps, meps = 0.05, 0.9, 0.99, 1e-8, 1e-4
    w = w0.clone().requires_grad_()
    opt = Shampoo(
        [w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, matrix_eps=meps, matrix_eps_relative=False,
        start_preconditioning_step=1, precondition_frequency=1, root_method="eigh", root_dtype=torch.float64,
        batched=batched,
    )  # fmt: skip
    ref = w0.clone()
    left = torch.zeros(6, 6, dtype=torch.float64)
    right = torch.zeros(27, 27, dtype=torch.float64)
    m = torch.zeros_like(w0)
    v = torch.zeros_like(w0)

    def root(a):  # (A + εI)^(-1/4), fp64 eigh
        lam, q = torch.linalg.eigh(a + meps * torch.eye(a.shape[0], dtype=a.dtype))
        return q @ torch.diag(lam.clamp_min(meps) ** -0.25) @ q.T

    for t, g in enumerate(grads, start=1):
        gm = g.reshape(6, 27)
        left = b2 * left + (1 - b2) * gm @ gm.T
        right = b2 * right + (1 - b2) * gm.T @ gm
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        adam = mhat / ((v / (1 - b2**t)).sqrt() + eps)
        # row-major vec: vec(L X R) = (L ⊗ Rᵀ) vec(X), R symmetric
        p = (torch.kron(root(left), root(right)) @ mhat.reshape(-1)).reshape(w0.shape)
        ref = ref - lr * p * (adam.norm() / p.norm())
        w.grad = g.clone()
        opt.step()
    state = opt.state[w]
    assert tuple(state["stat.0.0"].shape) == (6, 6) and tuple(state["stat.0.1"].shape) == (27, 27)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-10)


BAD_AXES = [
    ((1.0,), r"precondition_axes must be None or a sequence of ints \(dims of the parameter\), got \(1.0,\)"),
    ((True,), r"precondition_axes must be None or a sequence of ints \(dims of the parameter\), got \(True,\)"),
    (1, r"precondition_axes must be None or a sequence of ints \(dims of the parameter\), got 1"),
    ("1", r"precondition_axes must be None or a sequence of ints \(dims of the parameter\), got '1'"),
    ((1, 1), r"precondition_axes must be dims without repeats, got \(1, 1\)"),
    ((2,), r"precondition_axes=\(2,\) does not fit parameter 0 of its group, of shape \(4, 5\): each dim must be "
           r"in \[-2, 2\)"),
    ((-3,), r"precondition_axes=\(-3,\) does not fit parameter 0 of its group, of shape \(4, 5\)"),
    ((1, -1), r"precondition_axes=\(1, -1\) does not fit parameter 0 of its group, of shape \(4, 5\).*different dim"),
]  # fmt: skip


@pytest.mark.parametrize("axes, message", BAD_AXES)
def test_bad_precondition_axes_are_refused_by_name(axes, message):
    w = torch.zeros(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        Shampoo([w], precondition_axes=axes)
    opt = Shampoo([w])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict(params=[torch.zeros(4, 5, requires_grad=True)], precondition_axes=axes))
    assert len(opt.param_groups) == 1


def test_precondition_axes_out_of_range_for_a_bias_names_it():
    layer = nn.Linear(5, 4)
    with pytest.raises(ValueError, match=r"does not fit parameter 1 of its group, of shape \(4,\)"):
        Shampoo(layer.parameters(), precondition_axes=(1,))


def test_precondition_axes_choose_the_statistics_and_never_merge_listed_with_unlisted_dims():
    w = torch.zeros(32, 16, 3, 3, requires_grad=True)
    cases = {  # axes → (merged, dims of each merged axis, axes with statistics)
        None: ((32, 144), ((0,), (1, 2, 3)), (0, 1)),
        (0,): ((32, 144), ((0,), (1, 2, 3)), (0,)),
        (1,): ((32, 16, 9), ((0,), (1,), (2, 3)), (1,)),
        (-2, -1): ((32, 16, 9), ((0,), (1,), (2, 3)), (2,)),  # kh·kw alone
        (): ((32, 144), ((0,), (1, 2, 3)), ()),  # grafting alone
    }
    for axes, (merged, groups, kept) in cases.items():
        opt = Shampoo([w], precondition_axes=axes)
        plan = opt.plan(w, opt.param_groups[0])
        assert (plan.merged, plan.groups, plan.blocks[0].axes) == (merged, groups, kept), axes


def test_precondition_axes_d_side_only_keeps_the_table_rows_on_the_grafted_diagonal():
    """An embedding table with ``(-1,)``: the d×d statistic only, and the update of each
    row is the Adam update rotated by the same d×d root (so rows never looked up don't move)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8)
    opt = Shampoo(param_groups_for(emb), lr=1e-2, start_preconditioning_step=2, precondition_frequency=1,
                  weight_decay=0.0)  # fmt: skip
    before = emb.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        emb(torch.tensor([1, 2, 3, 7])).square().sum().backward()
        opt.step()
    state = opt.state[emb.weight]
    assert sorted(k for k in state if k.startswith("stat.")) == ["stat.0.1"]
    assert "root.0.1" in state and tuple(state["root.0.1"].shape) == (8, 8)
    moved = (emb.weight.detach() != before).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [1, 2, 3, 7]


def test_param_groups_for_puts_each_parameter_once_and_passes_options():
    emb = nn.Embedding(20, 6)
    head = nn.Linear(6, 20, bias=False)
    head.weight = emb.weight  # tied
    frozen = nn.Linear(6, 6)
    frozen.requires_grad_(False)
    model = nn.Sequential(emb, frozen, head)
    groups = param_groups_for(model, weight_decay=0.0)
    assert len(groups) == 1 and groups[0]["params"] == [emb.weight]
    assert groups[0]["precondition_axes"] == (-1,) and groups[0]["weight_decay"] == 0.0
    both = param_groups_for(nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 3)), embedding_axes=None)
    assert [len(g["params"]) for g in both] == [2, 1] and both[1]["precondition_axes"] is None
    with pytest.raises(ValueError, match=r"embedding_axes must be None or a sequence of dims of a table .*got \(2,\)"):
        param_groups_for(model, embedding_axes=(2,))
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got list"):
        param_groups_for([emb.weight])  # type: ignore[arg-type]


def test_plan_table_prints_what_was_chosen():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))
    opt = Shampoo(model.parameters())
    text = str(opt.plan_table(model))
    assert "| 0.weight | [32, 16, 3, 3] | [32, 144] | 1 | 0, 1·2·3 | 1×144² + 1×32² | 21,760 | 3e+06 |" in text
    assert "| 0.bias | [32] | [32] | 1 | none (grafting) | – | 0 | 0 |" in text
    table = Shampoo(model.parameters()).plan_table()
    assert table.rows[0]["name"] == "0.0"
    assert table.totals["statistics"] == 144**2 + 32**2 + 32**2 + 10**2


def test_precondition_axes_round_trip_through_a_checkpoint(tmp_path):
    """A helper-built optimizer saved with torch.save and loaded with weights_only=True continues
    exactly as the uninterrupted one."""

    def setup():
        torch.manual_seed(0)
        model = nn.ModuleDict(dict(emb=nn.Embedding(30, 6), conv=nn.Conv2d(2, 4, 3)))
        opt = Shampoo(param_groups_for(model), lr=1e-2, start_preconditioning_step=2, precondition_frequency=2)
        return model, opt

    def step(model, opt, t):
        g = torch.Generator().manual_seed(t)
        opt.zero_grad()
        x = torch.randn(2, 2, 5, 5, generator=g)
        (model["emb"](torch.randint(30, (8,), generator=g)).sum() + model["conv"](x).square().sum()).backward()
        opt.step()

    model, opt = setup()
    for t in range(5):
        step(model, opt, t)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for t in range(5, 9):
        step(model, opt, t)
    model2, opt2 = setup()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[1]["precondition_axes"] == (-1,)
    for t in range(5, 9):
        step(model2, opt2, t)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
