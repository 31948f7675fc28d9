"""Writes ``format1.pt``: a checkpoint saved by scalable_shampoo's format 1 (dims merged
from the left), for ``tests/test_state_format.py``. Run it with the library as it was
before fan-in grouping (commit 4c15e9f) first on the path::

    git archive 4c15e9f src | tar -x -C OLD && PYTHONPATH=OLD/src python tests/data/make_format1.py

It trains four parameters for 12 steps (roots from step 10, every 2), saves the
optimizer, then takes 4 more steps with stored gradients and keeps the weights, so
a test can check that a parameter whose plan did not change continues exactly.
"""

import copy
from pathlib import Path

import torch

import scalable_shampoo
from scalable_shampoo import Shampoo

assert scalable_shampoo.FORMAT_VERSION == 1, "run this with the format-1 library"

SHAPES = {
    "linear": (16, 32),  # same plan under both rules: [16, 32]
    "conv": (8, 4, 3, 3),  # left: [8, 4, 3, 3] (never a vector); fan-in: [8, 36]
    "cube": (8, 8, 8, 8),  # bound 512, block 8: left [512, 8], fan-in [8, 512]; both 64 blocks of 8×8
    "conv_same": (16, 4, 3, 3),  # bound 36: [16, 36] under both rules
}


def main() -> None:
    torch.manual_seed(0)
    params = {k: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in SHAPES.items()}
    groups = [
        dict(params=[params["linear"], params["conv"]]),
        dict(params=[params["cube"]], merge_dims_bound=512, block_size=8),
        dict(params=[params["conv_same"]], merge_dims_bound=36),
    ]
    opt = Shampoo(groups, lr=1e-2, start_preconditioning_step=10, precondition_frequency=2)
    grads = [{k: torch.randn(s, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(16)]

    def step(g: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()

    for g in grads[:12]:
        step(g)
    saved = {
        "optimizer": copy.deepcopy(opt.state_dict()),  # its tensors are the live state
        "params": {k: p.detach().clone() for k, p in params.items()},
        "grads_after": grads[12:],
    }
    for g in grads[12:]:
        step(g)
    saved["params_after"] = {k: p.detach().clone() for k, p in params.items()}
    torch.save(saved, Path(__file__).with_name("format1.pt"))


if __name__ == "__main__":
    main()
