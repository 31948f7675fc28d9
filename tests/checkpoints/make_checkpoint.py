"""Write a small frozen Shampoo checkpoint for ``tests/test_checkpoint_formats.py``.

Run it with the scalable_shampoo whose checkpoint is to be frozen first on the path::

    PYTHONPATH=<that version's src> python tests/checkpoints/make_checkpoint.py OUT.pt "who wrote it"

It uses only what the first release had (its constructor arguments, ``InlineRoots``),
so every version can run it. The file holds the parameters after ``STEPS`` steps and
``optimizer.state_dict()``; the test rebuilds the same model and data from here.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

STEPS = 6
SHAPES = [(5, 6), (5,), (3, 5), (3,)]  # a two-layer MLP: 6 → 5 → 3


def parameters() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.5) for s in SHAPES]


def param_groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 5e-3, "weight_decay": 0.0}]


def settings() -> dict[str, Any]:
    """Every setting spelled out, so that no default changed since the first release matters."""
    return dict(
        betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, momentum=0.5, grafting="adam", block_size=4,
        max_preconditioner_dim=4096, precondition_frequency=2, start_preconditioning_step=2, matrix_eps=1e-6,
        matrix_eps_relative=True, root_method="eigh", root_dtype=torch.float32, max_root_residual=0.5, root_retries=3,
    )  # fmt: skip


def loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """The loss at ``step`` (1-based): a fixed batch per step."""
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    w1, b1, w2, b2 = params
    return (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).pow(2).mean()


def train(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], first: int, last: int) -> None:
    """Steps ``first`` … ``last`` (1-based)."""
    for step in range(first, last + 1):
        opt.zero_grad()
        loss(params, step).backward()
        opt.step()


def main(path: str, writer: str) -> None:
    from scalable_shampoo import Shampoo

    params = parameters()
    opt = Shampoo(param_groups(params), **settings())
    train(opt, params, 1, STEPS)
    torch.save({"writer": writer, "params": [p.detach() for p in params], "optimizer": opt.state_dict()}, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
