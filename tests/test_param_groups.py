"""The param-group recipe of ``examples/param_groups.py``: no weight decay on norms and biases,
Adam only (no statistics, no roots: exactly AdamW) for the embeddings and the output head."""

import torch
import torch.nn.functional as F
from example_loader import load, one_thread  # noqa: F401 (autouse fixture)

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.models import CharGPT

ex = load("param_groups")
FAST = dict(lr=1e-2, block_size=32, precondition_frequency=2, start_preconditioning_step=2)


def setup():
    torch.manual_seed(0)
    model = CharGPT(30, 16, d=32, layers=1, heads=2)
    adam_only = [model.tok, model.pos, model.head]
    groups = ex.param_groups(model, weight_decay=0.1, adam_only=adam_only)
    return model, adam_only, groups


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 30, (4, 17), generator=g)


def test_groups_split_the_parameters_as_the_recipe_says():
    model, adam_only, groups = setup()
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert sorted(sum(ids, [])) == sorted(id(p) for p in model.parameters())  # each parameter once
    norms_and_biases = {id(p) for n, p in model.named_parameters() if "ln" in n or n.endswith(".bias")}
    assert set(ids[2]) == norms_and_biases and groups[2]["weight_decay"] == 0.0
    assert set(ids[1]) == {id(m.weight) for m in adam_only}


def test_adam_only_group_keeps_no_statistic_and_equals_adamw():
    model, adam_only, groups = setup()
    opt = Shampoo(groups, **FAST)
    tables = [m.weight for m in adam_only]
    for p in tables:  # every axis is longer than max_preconditioner_dim=1: nothing preconditioned
        assert not Shampoo.plan(p, opt.param_groups[1]).preconditioned
    copies = [p.detach().clone().requires_grad_() for p in tables]
    adamw = torch.optim.AdamW(copies, lr=FAST["lr"], weight_decay=0.1)
    for step in range(8):  # roots at steps 2, 4, 6, 8 for the other matrices
        w = batch(step)
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for c, p in zip(copies, tables):
            c.grad = p.grad.clone()
        opt.step()
        adamw.step()
    for c, p in zip(copies, tables):
        assert not any(k.startswith(("stat.", "root")) for k in opt.state[p])
        torch.testing.assert_close(p, c, rtol=1e-5, atol=1e-6)
    preconditioned = model.blocks[0].mlp[0].weight
    assert any(k.startswith("root.") for k in opt.state[preconditioned])  # the rest is Shampoo


def test_norms_and_biases_are_not_decayed():
    model, _, groups = setup()
    opt = Shampoo(groups, **FAST)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: only weight decay moves a weight
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - FAST["lr"] * 0.1), rtol=1e-6, atol=0)
