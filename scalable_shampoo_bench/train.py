"""One training run: a task, an optimizer, an lr and a seed, timed without its evaluations."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .optimizers import make_optimizer, schedule
from .tasks import Task


@dataclass
class Point:
    """One row of runs.csv: the state after ``step`` steps and ``seconds`` of training."""

    task: str
    optimizer: str
    lr: float
    seed: int
    step: int
    seconds: float  # training time only: batches, forward, backward, optimizer step
    train_loss: float  # mean training loss over the steps since the previous point (nan at step 0)
    eval_metric: float
    secondary: float = math.nan  # the task's second held-out metric, if it has one (ctr: AUC)


def run(
    task: Task,
    optimizer: str,
    lr: float,
    seed: int,
    steps: int,
    *,
    tiny: bool = False,
    device: torch.device | str = "cpu",
    eval_every: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[torch.optim.Optimizer, int], None] | None = None,
) -> list[Point]:
    """Train ``task``'s model from seed ``seed`` for ``steps`` steps and return its curve.

    The model's initial weights and the batch order depend on ``seed`` only, so every
    optimizer sees the same model and the same data in the same order.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    problem = task.build(tiny, device)
    model = problem.model
    model.train()
    torch.manual_seed(seed)  # anything random during training (none of our models uses dropout)
    opt = make_optimizer(optimizer, model, lr, task.weight_decay, embedding_groups=task.embedding_groups)
    sched = schedule(opt, steps)
    batches = problem.batches(torch.Generator().manual_seed(seed))
    every = max(1, eval_every or task.eval_every)

    def point(step: int, seconds: float, train_loss: float) -> Point:
        second = problem.secondary(model) if problem.secondary is not None else math.nan
        return Point(task.name, optimizer, lr, seed, step, seconds, train_loss, problem.evaluate(model), second)

    curve = [point(0, 0.0, math.nan)]
    seconds, loss_sum, loss_count = 0.0, 0.0, 0
    try:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            batch = next(batches)
            loss = problem.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())  # waits for the device, so the clock covers the whole step
            seconds += time.perf_counter() - start
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            if on_step is not None:
                on_step(step, value)
            if not math.isfinite(value):
                curve.append(Point(task.name, optimizer, lr, seed, step, seconds, value, math.nan))
                break  # diverged: the run ends here and never reaches any target
            if step % every == 0 or step == steps:
                curve.append(point(step, seconds, loss_sum / loss_count))
                loss_sum, loss_count = 0.0, 0
                if on_eval is not None:  # e.g. Shampoo's diagnostics, outside the timed region
                    on_eval(opt, step)
    finally:
        close = getattr(opt, "close", None)
        if close is not None:
            close()
    return curve
