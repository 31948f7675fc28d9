"""A root does not depend on which other matrices share its batch, nor on how the
work is split across ranks: batched roots equal roots computed alone, bit for bit,
and many small equal blocks on 2 and 3 gloo ranks equal one process, bit for bit."""

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import rank_state
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.background import ROOT_BATCHES, RootJob, RootOptions, compute_roots
from scalable_shampoo.matrix_roots import RootMethod, inverse_root, max_eigenvalue, root_power

FIELDS = ("root", "residual", "eps", "lambda_max", "ok", "stage")


def psd_batch(count, n, seed, dtype=torch.float32):
    """PSD matrices of every kind the chain meets: full rank, rank one, tiny, zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, n + 2, generator=g, dtype=torch.float64)
    a = x @ x.transpose(-1, -2)
    if count > 2:
        a[1] = torch.outer(x[1, :, 0], x[1, :, 0])
    if count > 3:
        a[3] *= 1e-30
    if count > 5:
        a[5] = 0
    return a.to(dtype)


def same(u, v):
    return torch.equal(u, v) or bool(u.isnan().all() and v.isnan().all())


# ---------------------------------------------------------------------- the elementwise power
def test_root_power_is_correctly_rounded_in_fp32_and_within_an_ulp_in_fp64():
    if np.finfo(np.longdouble).eps > 1e-18:
        pytest.skip("needs an 80-bit long double for the reference")
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(20000, generator=g, dtype=torch.float64) * 12)
    x32 = x.float()
    for p in (1, 2, 3, 4, 6, 8):
        for sign in (-1, 1):
            exact = np.power(x.numpy().astype(np.longdouble), np.longdouble(sign) / np.longdouble(p))
            rel = np.abs((root_power(x, p, sign).numpy().astype(np.longdouble) - exact) / exact).max()
            assert rel < 4e-16, (p, sign, rel)
            exact32 = np.power(x32.double().numpy().astype(np.longdouble), np.longdouble(sign) / np.longdouble(p))
            want = torch.from_numpy(exact32.astype(np.float64)).float()  # fp32 ties are not hit at random
            assert torch.equal(root_power(x32, p, sign), want), (p, sign)


def test_root_power_special_values_and_bad_p():
    x = torch.tensor([0.0, float("inf"), -1.0, float("nan"), 1.0, 5e-324, 1e308], dtype=torch.float64)
    inv, pos = root_power(x, 4), root_power(x, 4, 1)
    assert inv[[0, 1, 4]].tolist() == [float("inf"), 0.0, 1.0] and pos[[0, 1, 4]].tolist() == [0.0, float("inf"), 1.0]
    assert inv[2:4].isnan().all() and pos[2:4].isnan().all()  # negative and NaN
    want = torch.tensor([5e-324, 1e308], dtype=torch.float64)
    torch.testing.assert_close(root_power(x[5:], 4), want.pow(-0.25), rtol=1e-15, atol=0)  # subnormal, huge
    torch.testing.assert_close(root_power(x[5:], 1, 1), want, rtol=0, atol=0)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"p must be a positive integer.*p={bad!r}"):
            root_power(x, bad)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2999), st.sampled_from([1, 2, 3, 4, 6]),
       st.sampled_from([torch.float32, torch.float64]))
def test_root_power_of_an_element_does_not_depend_on_its_neighbours(length, start, p, dtype):
    x = torch.exp(torch.randn(length, generator=torch.Generator().manual_seed(length), dtype=dtype) * 3)
    start = start % length
    whole = root_power(x, p)
    assert torch.equal(root_power(x[start:], p), whole[start:])
    assert torch.equal(root_power(x[start : start + 1], p), whole[start : start + 1])


# ---------------------------------------------------------------------- roots of a batch vs alone
@pytest.mark.parametrize("n", [24, 33, 64])
def test_max_eigenvalue_of_a_batch_equals_each_alone(n):
    a = psd_batch(6, n, seed=n)
    whole = max_eigenvalue(a)
    for i in range(6):
        assert torch.equal(max_eigenvalue(a[i : i + 1]), whole[i : i + 1]), i


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 5, 8, 16, 17, 24, 31, 32, 33, 40]),
    count=st.integers(2, 6),
    offset=st.integers(0, 5),
    method=st.sampled_from(["eigh", "newton"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    p=st.sampled_from([2, 4, 6]),
)
def test_every_root_of_a_batch_equals_the_same_matrix_alone_bitwise(n, count, offset, method, dtype, p):
    a = psd_batch(count + offset, n, seed=n * 100 + count)
    batch = inverse_root(a[offset:], p, method=method, dtype=dtype)
    for i in range(count):
        alone = inverse_root(a[offset + i : offset + i + 1], p, method=method, dtype=dtype)
        for f in FIELDS:
            assert same(getattr(batch, f)[i], getattr(alone, f)[0]), (i, f)
    assert bool(batch.ok.any())


@pytest.mark.parametrize("n,count,method", [(16, 40, "eigh"), (17, 24, "eigh"), (32, 24, "eigh"), (20, 8, "newton")])
def test_roots_of_a_batch_equal_alone_at_every_offset(n, count, method):
    """The lead's measurement: 40 random 16×16 matrices, each of a batch against itself alone."""
    a = psd_batch(count, n, seed=n)
    batch = inverse_root(a, 4, method=method)
    for i in range(count):
        alone = inverse_root(a[i : i + 1], 4, method=method)
        for f in FIELDS:
            assert same(getattr(batch, f)[i], getattr(alone, f)[0]), (i, f)


@pytest.mark.parametrize("n", [5, 17, 30])
def test_padded_sizes_match_the_fp64_root(n):
    """Sizes that are not a multiple of 4 are padded for the kernels: the root is still
    (A + ε_eff·I)^(-1/p) to fp32 accuracy."""
    x = torch.randn(3, n, 4 * n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    a = x @ x.mT  # well conditioned: fp32 can resolve the root to ~1e-6
    res = inverse_root(a.float(), 4, method="eigh")
    lam, q = torch.linalg.eigh(a + res.eps.double()[:, None, None] * torch.eye(n, dtype=torch.float64))
    want = (q * lam.pow(-0.25).unsqueeze(-2)) @ q.mT
    err = ((res.root.double() - want).norm(dim=(-2, -1)) / want.norm(dim=(-2, -1))).max()
    assert bool(res.ok.all()) and res.root.shape == a.shape and err < 3e-6


def test_compute_roots_gives_each_job_what_it_gets_alone():
    """More jobs than ROOT_BATCHES, of three sizes: batched and split, each equals its job alone."""
    opts = RootOptions(RootMethod.EIGH, 1e-6, True, torch.float32, 0.5, 3, 100, 1e-6)
    jobs = [RootJob((i, 0, 0), 3, m, 4, opts) for i, m in enumerate(psd_batch(3 * ROOT_BATCHES + 5, 16, seed=1))]
    jobs += [RootJob((100 + i, 0, 1), 3, m, 4, opts) for i, m in enumerate(psd_batch(7, 5, seed=2))]
    jobs += [RootJob((200 + i, 1, 0), 3, m, 2, opts) for i, m in enumerate(psd_batch(9, 33, seed=3))]
    together = {o.key: o for o in compute_roots(jobs)}
    for job in jobs:
        (alone,) = compute_roots([job])
        got = together[job.key]
        assert torch.equal(got.root, alone.root) or (got.root.isnan().all() and alone.root.isnan().all())
        assert (got.residual, got.eps, got.lambda_max, got.ok, got.method) == (
            alone.residual, alone.eps, alone.lambda_max, alone.ok, alone.method)

STEPS = 12
OPTS = dict(lr=1e-2, block_size=16, precondition_frequency=3, start_preconditioning_step=3)


class Many(nn.Module):
    """Many 16×16 and 8×8 statistics: 4×2 + 3×4 + 1×3 + 188 blocks of four shapes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 64), nn.Linear(64, 40), nn.Linear(40, 5)
        self.emb = nn.Embedding(3000, 8)

    def forward(self, x, idx):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))), self.emb(idx)


def build():
    torch.manual_seed(0)
    return Many()


def train_step(model, opt, step):
    """The same gradient on every rank: a weighted sum of the outputs."""
    g = torch.Generator().manual_seed(step)
    x, idx = torch.randn(32, 24, generator=g), torch.randint(0, 3000, (256,), generator=g)
    out, emb = model(x, idx)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (emb * torch.randn(emb.shape, generator=g)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_tensors(model, opt):
    out = {}
    for i, p in enumerate(model.parameters()):
        out[f"param{i}"] = p.detach().clone()
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                out[f"{i}/{k}"] = v.clone()
    return out


def worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    model = build()
    opt = Shampoo(model.parameters(), **OPTS)  # the default group: each rank computes its share of the roots
    for step in range(STEPS):
        train_step(model, opt, step)
    torch.save({"state": state_tensors(model, opt), "rows": opt.rows()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_many_small_equal_blocks_on_ranks_equal_one_process_bitwise(tmp_path, world):
    torch.set_num_threads(1)
    ref = build()
    ref_opt = Shampoo(ref.parameters(), **OPTS)
    for step in range(STEPS):
        train_step(ref, ref_opt, step)
    want = state_tensors(ref, ref_opt)
    assert any(k.endswith("root.0.0") for k in want)  # roots were installed
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    seen = set()
    for rank in range(world):  # ZeRO-1: every parameter on every rank, each block's state on its owner only
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        got = saved["state"]
        params = [k for k in want if k.startswith("param")]
        assert {k for k in got if k.startswith("param")} == set(params)
        assert all(torch.equal(got[k], want[k]) for k in params), rank
        for i, pieces in enumerate(saved["rows"]):  # the rest: this rank's part of one process's state
            mine = rank_state(ref_opt, i, pieces, rank) or {}
            assert {k for k in got if k.startswith(f"{i}/")} == {f"{i}/{k}" for k in mine}, (rank, i)
            differ = [k for k, v in mine.items() if not torch.equal(got[f"{i}/{k}"], v)]
            assert not differ, f"rank {rank}: parameter {i}: {differ[:5]} differ from one process"
            blocks = {f"{i}/{k}" for k in mine if len(k.split(".")) == 3}
            assert seen.isdisjoint(blocks)
            seen |= blocks
    assert seen == {k for k in want if len(k.split(".")) == 3}  # every block's entries on one rank
