"""Shampoo inside the Hugging Face Trainer (``examples/hf_trainer.py``): training, the two ways
of passing it, and a checkpoint resumed with ``resume_from_checkpoint`` bit for bit."""

import pytest
import torch
from example_loader import assert_bitwise, load, one_thread  # noqa: F401 (autouse fixture)

hf = load("hf_trainer")
STEPS, STOP = 10, 4  # roots submitted at step 3 are installed at 5 (delay 2): in flight at the cut


def finish(trainer):
    opt = hf.shampoo_of(trainer)
    state = {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "opt": opt.state_dict()}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    opt.close()
    return state, losses, opt


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path, background):
    full = hf.make_trainer(str(tmp_path / "full"), STEPS, background=background)
    full.train()
    expected, expected_losses, opt = finish(full)
    assert opt.global_step == STEPS
    installed = [r for r in opt.diagnostics()["blocks"] if r["has_root"]]
    assert installed, "no root was installed: the run never preconditioned"
    assert expected_losses[-1] < expected_losses[0] - 0.5

    first = hf.make_trainer(str(tmp_path / "cut"), STEPS, save_steps=STOP, stop_at=STOP, background=background)
    first.train()
    assert first.state.global_step == STOP
    finish(first)
    saved = torch.load(tmp_path / "cut" / f"checkpoint-{STOP}" / "optimizer.pt", weights_only=True)
    if background:  # the checkpoint holds roots still in flight, installed only after the resume
        assert saved["scalable_shampoo"]["scheduler"]["pending"]

    resumed = hf.make_trainer(str(tmp_path / "cut"), STEPS, save_steps=STOP, background=background)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{STOP}"))
    got, got_losses, _ = finish(resumed)
    assert resumed.state.global_step == STEPS
    assert_bitwise(got, expected)
    assert got_losses == expected_losses  # the first STOP come from the checkpoint's trainer_state.json


def test_optimizer_cls_and_kwargs_equals_passing_the_instance(tmp_path):
    by_cls = hf.make_trainer(str(tmp_path / "cls"), 6, cls_and_kwargs=True)
    by_cls.train()
    opt = hf.shampoo_of(by_cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the Trainer's groups
    by_instance = hf.make_trainer(str(tmp_path / "inst"), 6)
    by_instance.train()
    a, a_losses, _ = finish(by_cls)
    b, b_losses, _ = finish(by_instance)
    assert_bitwise(a, b)
    assert a_losses == b_losses
