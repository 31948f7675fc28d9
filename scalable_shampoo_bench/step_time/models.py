"""The step-time benchmark's models, their sizes, and a fixed batch and loss for each (end to end)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import CharGPT, ResNet

MODELS = ("linear4", "chargpt", "transformer", "resnet", "cnn", "embedding")


# ---------------------------------------------------------------------------------------------- models
class EmbeddingMLP(nn.Module):
    """An embedding table (``rows × d``), the mean over each bag of indices, then a ``d-hidden-1`` MLP."""

    def __init__(self, rows: int, d: int, hidden: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, idx: Tensor) -> Tensor:  # idx: (batch, bag) → one logit per row
        return self.mlp(self.table(idx).mean(dim=1)).squeeze(1)


def model_dims(name: str, quick: bool) -> dict[str, Any]:
    """The model's sizes; ``quick``: tiny ones, for the smoke test."""
    if name == "linear4":
        return {"d": 64 if quick else 1024, "layers": 4}
    if name == "chargpt":  # vocab ~ Shakespeare's characters
        if quick:
            return {"vocab": 11, "ctx": 8, "d": 16, "layers": 1, "heads": 2}
        return {"vocab": 65, "ctx": 128, "d": 128, "layers": 4, "heads": 4}
    if name == "transformer":
        if quick:
            return {"d": 32, "layers": 1, "heads": 2, "ff": 64}
        return {"d": 512, "layers": 4, "heads": 8, "ff": 2048}
    if name == "resnet":  # 1×28×28 images, as Fashion-MNIST
        if quick:
            return {"widths": [4, 8], "classes": 3, "image": 8}
        return {"widths": [16, 32, 64], "classes": 10, "image": 28}
    if name == "cnn":  # 3×32×32 images, as CIFAR-10
        if quick:
            return {"widths": [4, 8], "classes": 3, "image": 8, "channels": 3, "depth": 2}
        return {"widths": [32, 64, 128], "classes": 10, "image": 32, "channels": 3, "depth": 2}
    if name == "embedding":  # quick: still more rows than max_preconditioner_dim (4096), so one-sided as in full
        if quick:
            return {"rows": 5000, "d": 8, "hidden": 16}
        return {"rows": 100_000, "d": 64, "hidden": 256}
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_model(name: str, quick: bool, device: torch.device, seed: int = 0) -> nn.Module:
    dims = model_dims(name, quick)
    torch.manual_seed(seed)
    model: nn.Module
    if name == "linear4":
        model = nn.Sequential(*[nn.Linear(dims["d"], dims["d"]) for _ in range(dims["layers"])])
    elif name == "chargpt":
        model = CharGPT(dims["vocab"], dims["ctx"], d=dims["d"], layers=dims["layers"], heads=dims["heads"])
    elif name == "transformer":
        layer = nn.TransformerEncoderLayer(
            dims["d"], dims["heads"], dims["ff"], dropout=0.0, batch_first=True
        )
        model = nn.TransformerEncoder(layer, dims["layers"], enable_nested_tensor=False)
    elif name == "resnet":
        model = ResNet(tuple(dims["widths"]), classes=dims["classes"])
    elif name == "cnn":
        widths = tuple(dims["widths"])
        model = ResNet(widths, classes=dims["classes"], in_channels=dims["channels"], depth=dims["depth"])
    else:
        model = EmbeddingMLP(dims["rows"], dims["d"], dims["hidden"])
    return model.to(device)


def e2e_shape(name: str, quick: bool, args: argparse.Namespace | None = None) -> dict[str, int]:
    """The end-to-end batch of each model; ``--e2e-batch`` / ``--e2e-seq`` override the batch / sequence length."""
    shape: dict[str, int] = {
        "linear4": {"batch": 8} if quick else {"batch": 512},  # rows of d features
        "chargpt": {"batch": 2, "seq": 8} if quick else {"batch": 32, "seq": 128},
        "transformer": {"batch": 2, "seq": 8} if quick else {"batch": 8, "seq": 64},
        "resnet": {"batch": 4} if quick else {"batch": 128},
        "cnn": {"batch": 4} if quick else {"batch": 128},
        "embedding": {"batch": 8, "bag": 4} if quick else {"batch": 256, "bag": 16},
    }[name]
    if args is not None:
        if args.e2e_batch is not None:
            shape["batch"] = args.e2e_batch
        if args.e2e_seq is not None and "seq" in shape:
            shape["seq"] = args.e2e_seq
    return shape


def e2e_loss(
    name: str, dims: dict[str, Any], shape: dict[str, int], device: torch.device, seed: int = 2
) -> Callable[[nn.Module], Tensor]:
    """A fixed batch for ``name`` and the loss of a model on it.

    linear4 and transformer: random float inputs, MSE to random targets; chargpt: token
    ids, next-token cross-entropy; resnet: 1×H×W images, cross-entropy over the classes;
    embedding: bags of uniform random row ids, BCE with logits to random 0/1 labels.
    """
    gen = torch.Generator().manual_seed(seed)
    b = shape["batch"]
    if name in ("linear4", "transformer"):
        size = (b, dims["d"]) if name == "linear4" else (b, shape["seq"], dims["d"])
        x = torch.randn(size, generator=gen).to(device)
        y = torch.randn(size, generator=gen).to(device)
        return lambda model: F.mse_loss(model(x), y)
    if name == "chargpt":
        tokens = torch.randint(dims["vocab"], (b, shape["seq"] + 1), generator=gen).to(device)
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        return lambda model: F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    if name in ("resnet", "cnn"):
        x = torch.randn(b, dims.get("channels", 1), dims["image"], dims["image"], generator=gen).to(device)
        y = torch.randint(dims["classes"], (b,), generator=gen).to(device)
        return lambda model: F.cross_entropy(model(x), y)
    if name == "embedding":
        idx = torch.randint(dims["rows"], (b, shape["bag"]), generator=gen).to(device)
        y = torch.randint(2, (b,), generator=gen).float().to(device)
        return lambda model: F.binary_cross_entropy_with_logits(model(idx), y)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def set_fixed_grads(model: nn.Module, seed: int) -> None:
    """``p.grad`` from a seeded generator, the same for every copy of the model; set once, re-used."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device=p.device, dtype=p.dtype)
