"""The param-group recipe: no weight decay on norms and biases, Adam only for embeddings and the head.

    python examples/param_groups.py --steps 100

Shampoo preconditions every matrix; several large-scale users of Shampoo-family
optimizers leave the embedding tables and the output head to the grafted first-order
method (Adam here) and keep weight decay off norms and biases. With plain param groups:

* ``max_preconditioner_dim=1`` makes every axis of a tensor "too long" to keep a
  statistic, so those tensors get no statistics and no roots: their update is exactly
  AdamW's (Adam grafting).
* vectors (biases, norm gains) are never preconditioned (unless ``precondition_1d=True``);
  ``weight_decay=0.0`` keeps them from shrinking.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.data import shakespeare
from scalable_shampoo_bench.models import CharGPT


def param_groups(model: nn.Module, weight_decay: float, adam_only: list[nn.Module]) -> list[dict]:
    """Three groups: preconditioned matrices (decayed), Adam-only tables and head (decayed),
    and every vector (norm gains, biases: no decay)."""
    adam_only_ids = {id(p) for m in adam_only for p in m.parameters()}
    matrices, tables, vectors = [], [], []
    for p in model.parameters():
        if p.ndim < 2:
            vectors.append(p)
        elif id(p) in adam_only_ids:
            tables.append(p)
        else:
            matrices.append(p)
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": tables, "weight_decay": weight_decay, "max_preconditioner_dim": 1},
        {"params": vectors, "weight_decay": 0.0},
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args(argv)
    corpus, ctx = shakespeare(max_chars=200_000), 32
    torch.manual_seed(0)
    model = CharGPT(len(corpus.vocab), ctx, d=64, layers=2, heads=4)
    groups = param_groups(model, weight_decay=0.1, adam_only=[model.tok, model.pos, model.head])
    optimizer = Shampoo(groups, lr=3e-3, block_size=128)
    gen = torch.Generator().manual_seed(0)
    for _ in range(a.steps):
        starts = torch.randint(0, len(corpus.train) - ctx - 1, (16,), generator=gen).tolist()
        w = torch.stack([corpus.train[s : s + ctx + 1] for s in starts])
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss after {a.steps} steps: {loss.item():.4f}")


if __name__ == "__main__":
    main()
