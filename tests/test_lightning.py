"""Shampoo in PyTorch Lightning (``examples/lightning_example.py``): ``configure_optimizers``,
gradient clipping by Lightning, and a checkpoint resumed with ``ckpt_path=`` bit for bit."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from example_loader import assert_bitwise, load, one_thread  # noqa: F401 (autouse fixture)

pl_ex = load("lightning_example")
BATCH, EPOCH = 8, 4  # 4 batches an epoch
STEPS, STOP = 10, 4  # the cut is at an epoch's end; roots at steps 3 and 8


def fit(tmp, steps, *, clip=1.0, save_every=None, ckpt=None):
    loader, vocab = pl_ex.char_data(samples=BATCH * EPOCH, batch_size=BATCH)
    module = pl_ex.CharLM(vocab, total_steps=STEPS)
    trainer = pl_ex.make_trainer(str(tmp), steps, save_every=save_every, clip=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, ckpt_path=ckpt)
    return module, trainer


def state(module, trainer):
    opt = trainer.optimizers[0]
    return {
        "model": module.state_dict(),
        "opt": opt.state_dict(),
        "lr": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    }


def test_ckpt_path_resume_continues_bit_for_bit(tmp_path):
    full, full_trainer = fit(tmp_path / "full", STEPS)
    opt = full_trainer.optimizers[0]
    assert type(opt).__name__ == "Shampoo" and opt.global_step == STEPS
    assert any(r["has_root"] for r in opt.diagnostics()["blocks"])
    assert full.losses[-1] < full.losses[0] - 0.3

    cut, _ = fit(tmp_path / "cut", STOP, save_every=STOP)
    assert len(cut.losses) == STOP
    ckpt = tmp_path / "cut" / "last.ckpt"
    resumed, resumed_trainer = fit(tmp_path / "cut", STEPS, ckpt=str(ckpt))
    assert resumed_trainer.global_step == STEPS
    assert resumed.losses == full.losses[STOP:]
    assert_bitwise(state(resumed, resumed_trainer), state(full, full_trainer))


def test_lightning_clips_before_shampoo_steps(tmp_path):
    """Lightning's gradient_clip_val equals clipping by hand before each Shampoo step."""
    clip = 0.05
    module, trainer = fit(tmp_path, EPOCH, clip=clip)
    loader, vocab = pl_ex.char_data(samples=BATCH * EPOCH, batch_size=BATCH)
    ref = pl_ex.CharLM(vocab, total_steps=STEPS)
    conf = ref.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    norms = []
    for x, y in loader:  # epoch 0's order, as Lightning's first epoch (roots at step 3)
        loss = F.cross_entropy(ref.model(x).flatten(0, 1), y.flatten())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        sched.step()
    assert len(norms) == EPOCH and min(norms) > clip  # every step was clipped
    assert_bitwise(module.state_dict(), ref.state_dict())
    assert_bitwise(trainer.optimizers[0].state_dict(), opt.state_dict())


@pytest.mark.parametrize("clip", [0.5, 0.05])
def test_clipping_leaves_the_first_update_unchanged_and_reweights_later_steps(tmp_path, clip):
    """What clipping does to Shampoo's update (documented in the README): with Adam grafting
    the step's length is Adam's, which a uniform scale of the gradient does not change (but
    for entries whose clipped gradient is near eps), so a clipped first step is the unclipped
    one; clipping only reweights steps against each other in the moments and statistics, so
    later steps differ."""
    init = fit(tmp_path / "0", 0)[0].state_dict()
    one_free, one_clip = fit(tmp_path / "a", 1, clip=None)[0], fit(tmp_path / "b", 1, clip=clip)[0]
    worst = 0.0
    for k, w0 in init.items():
        d_free, d_clip = one_free.state_dict()[k] - w0, one_clip.state_dict()[k] - w0
        if d_free.norm() > 0:
            worst = max(worst, float((d_clip - d_free).norm() / d_free.norm()))
    print(f"clip {clip}: worst relative change of a parameter's first update {worst:.2e}")
    assert worst < 0.05
    five_free, five_clip = fit(tmp_path / "c", 5, clip=None)[0], fit(tmp_path / "d", 5, clip=clip)[0]
    diff = max(float((five_free.state_dict()[k] - five_clip.state_dict()[k]).abs().max()) for k in init)
    assert diff > 1e-4
