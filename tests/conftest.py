"""Helpers shared by the test files: parameters, random-gradient steps, and a training loop.

Plain functions, imported as ``from conftest import …`` (pytest puts this folder on
``sys.path`` before it imports the test files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: with tiny matrices it is several times faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float64, seed: int = 0):
    """Leaf tensors of these shapes, standard normal entries (drawn in fp32, then cast to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def step_on_random_grads(params, opt, steps: int, seed: int = 1, drop: Callable[[int, int], bool] | None = None):
    """``steps`` optimizer steps, each on fresh standard normal gradients from one seeded generator.

    ``drop(t, i)`` true: parameter ``i`` has no gradient at step ``t`` (its gradient is still drawn,
    so the others' do not depend on which are dropped).
    """
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            p.grad = None if drop is not None and drop(t, i) else grad
        opt.step()


def run(make_opt: Callable[[list[torch.Tensor]], Any], shapes, steps: int = 10, dtype: torch.dtype = torch.float64):
    """Parameters from :func:`make_params`, an optimizer ``make_opt(params)``, and ``steps`` steps on random
    gradients (:func:`step_on_random_grads`); returns the parameters and the optimizer."""
    params = make_params(shapes, dtype)
    opt = make_opt(params)
    step_on_random_grads(params, opt, steps)
    return params, opt


def train(model: torch.nn.Module, opt, batches: Iterable[Any], loss: Callable[[torch.nn.Module, Any], torch.Tensor]):
    """One step per batch: zero the gradients, ``loss(model, batch).backward()``, step; the last loss as a float."""
    last = torch.tensor(0.0)
    for batch in batches:
        opt.zero_grad()
        last = loss(model, batch)
        last.backward()
        opt.step()
    return float(last.detach())
