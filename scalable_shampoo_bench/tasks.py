"""The benchmark tasks: data, model, batches (a function of the seed only), loss and eval metric.

``tiny=True`` shrinks data and model to a few hundred examples and a few thousand
weights, for the smoke tests; the code path is otherwise the one a full run takes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, models

Batch = tuple[Tensor, ...]


@dataclass
class Problem:
    """One model, ready to train: ``batches(gen)`` yields the same batches for the same generator state."""

    model: nn.Module
    batches: Callable[[torch.Generator], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module], float]
    secondary: Callable[[nn.Module], float] | None = None  # a second held-out metric (ctr: AUC)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    metric: str  # what ``evaluate`` returns
    higher_is_better: bool
    build: Callable[[bool, torch.device], Problem]
    steps_per_epoch: Callable[[bool], int]
    default_steps: int  # the full budget
    eval_every: int
    weight_decay: float
    lrs: dict[str, float]  # each optimizer's default lr: the best of the lr grid in RESULTS.md (median of 3 seeds)
    optimizers: tuple[str, ...] = ("shampoo", "adamw")
    embedding_groups: bool = False  # Shampoo's params from param_groups_for(model): tables one-sided
    secondary_metric: str | None = None  # what ``Problem.secondary`` returns


def epoch_batches(n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Index batches, a fresh permutation each epoch; the last partial batch is dropped."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def _on(device: torch.device, *xs: Tensor) -> Batch:
    return tuple(x.to(device, non_blocking=True) for x in xs)


@torch.no_grad()
def _mean_over(model: nn.Module, chunks: Iterator[Batch], fn: Callable[[nn.Module, Batch], tuple[float, int]]) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in chunks:
        s, c = fn(model, chunk)
        total, count = total + s, count + c
    model.train(was)
    return total / max(count, 1)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


# --------------------------------------------------------------------------- lm
@lru_cache(maxsize=2)
def _corpus(tiny: bool, key: str = "") -> data.CharCorpus:
    return data.shakespeare(max_chars=60_000 if tiny else None)


def build_lm(tiny: bool, device: torch.device) -> Problem:
    corpus = _corpus(tiny, data.cache_key())
    ctx, batch, d, layers, heads = (16, 4, 16, 1, 2) if tiny else (128, 32, 128, 4, 4)
    model = models.CharGPT(len(corpus.vocab), ctx, d, layers, heads).to(device)
    offsets = torch.arange(ctx + 1)

    def windows(text: Tensor, starts: Tensor) -> Batch:
        w = text[starts[:, None] + offsets]
        return _on(device, w[:, :-1], w[:, 1:])

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        while True:
            yield windows(corpus.train, torch.randint(0, len(corpus.train) - ctx - 1, (batch,), generator=gen))

    def loss(m: nn.Module, b: Batch) -> Tensor:
        x, y = b
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    val_gen = torch.Generator().manual_seed(1234)
    val_starts = torch.randint(0, len(corpus.val) - ctx - 1, ((2 if tiny else 6) * batch,), generator=val_gen)

    def evaluate(m: nn.Module) -> float:
        chunks = (windows(corpus.val, val_starts[s]) for s in _chunks(len(val_starts), batch))
        return _mean_over(m, chunks, lambda m, b: (float(loss(m, b)) * len(b[0]), len(b[0])))

    return Problem(model, batches, loss, evaluate)


# --------------------------------------------------------------------------- image
@lru_cache(maxsize=2)
def _fashion(tiny: bool, key: str = "") -> data.ImageSplits:
    return data.fashion_mnist(512, 256) if tiny else data.fashion_mnist()


def build_image(tiny: bool, device: torch.device) -> Problem:
    d = _fashion(tiny, data.cache_key())
    batch = 32 if tiny else 128
    model = models.ResNet((4, 8) if tiny else (16, 32, 64)).to(device)

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        for idx in epoch_batches(len(d.train_y), batch, gen):
            yield _on(device, d.train_x[idx], d.train_y[idx])

    def loss(m: nn.Module, b: Batch) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    def evaluate(m: nn.Module) -> float:
        chunks = (_on(device, d.test_x[s], d.test_y[s]) for s in _chunks(len(d.test_y), 1000))
        return _mean_over(m, chunks, lambda m, b: (float((m(b[0]).argmax(1) == b[1]).sum()), len(b[1])))

    return Problem(model, batches, loss, evaluate)


# --------------------------------------------------------------------------- ctr
@lru_cache(maxsize=2)
def _clicks(tiny: bool, key: str = "") -> tuple[data.ClickData, Tensor, Tensor]:
    d = data.movielens(2000 if tiny else None)
    perm = torch.randperm(len(d.label), generator=torch.Generator().manual_seed(0))
    n_test = len(perm) // 5
    return d, perm[n_test:], perm[:n_test]


def build_ctr(tiny: bool, device: torch.device) -> Problem:
    d, train, test = _clicks(tiny, data.cache_key())
    batch = 64 if tiny else 256
    dim, top = (8, (16, 8)) if tiny else (32, (256, 128))
    model = models.DLRM(d.cardinalities, d.dense.shape[1], dim, top).to(device)

    def rows(idx: Tensor) -> Batch:
        return _on(device, d.sparse[idx], d.dense[idx], d.label[idx])

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        for i in epoch_batches(len(train), batch, gen):
            yield rows(train[i])

    def loss(m: nn.Module, b: Batch) -> Tensor:
        return F.binary_cross_entropy_with_logits(m(b[0], b[1]), b[2])

    def evaluate(m: nn.Module) -> float:
        chunks = (rows(test[s]) for s in _chunks(len(test), 4096))
        return _mean_over(m, chunks, lambda m, b: (float(loss(m, b)) * len(b[2]), len(b[2])))

    @torch.no_grad()
    def test_auc(m: nn.Module) -> float:
        was = m.training
        m.eval()
        scores = torch.cat([m(b[0], b[1]) for b in (rows(test[s]) for s in _chunks(len(test), 4096))])
        m.train(was)
        return auc(scores, d.label[test].to(scores.device))

    return Problem(model, batches, loss, evaluate, test_auc)


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative (ties
    count ½), by the rank-sum (Mann–Whitney) formula with tied scores given their mean rank."""
    s = scores.detach().double().flatten().cpu()
    y = labels.detach().flatten().cpu() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct score's first element
    mean_rank = first.double() + (counts.double() + 1) / 2  # 1-based mean rank of the ties
    rank_sum = float(mean_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# --------------------------------------------------------------------------- autoencoder
@lru_cache(maxsize=2)
def _mnist(tiny: bool, key: str = "") -> tuple[Tensor, Tensor]:
    return data.mnist(256 if tiny else None)


def build_autoencoder(tiny: bool, device: torch.device) -> Problem:
    train, test = _mnist(tiny, data.cache_key())
    batch = 64 if tiny else 1000
    model = models.Autoencoder((784, 32, 16, 8) if tiny else (784, 1000, 500, 250, 30)).to(device)

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        for idx in epoch_batches(len(train), batch, gen):
            yield _on(device, train[idx])

    def bce(m: nn.Module, x: Tensor) -> Tensor:  # summed over pixels, per image
        return F.binary_cross_entropy_with_logits(m(x), x, reduction="sum") / len(x)

    def evaluate(m: nn.Module) -> float:
        chunks = (_on(device, test[s]) for s in _chunks(len(test), 2500))
        return _mean_over(m, chunks, lambda m, b: (float(bce(m, b[0])) * len(b[0]), len(b[0])))

    return Problem(model, batches, lambda m, b: bce(m, b[0]), evaluate)


# --------------------------------------------------------------------------- translate
PAD, UNK, BOS, EOS = 0, 1, 2, 3
_WORD = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _encode(sentences: list[list[str]], vocab: dict[str, int], max_len: int, bos: bool) -> Tensor:
    out = torch.full((len(sentences), max_len + 1), PAD, dtype=torch.int64)
    for i, words in enumerate(sentences):
        ids = [BOS] * bos + [vocab.get(w, UNK) for w in words][: max_len - 1] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@lru_cache(maxsize=2)
def _bible(tiny: bool, key: str = "") -> dict[str, Any]:
    pairs = data.bible_pairs(first_chapter=3 if tiny else None)
    vocab_size, max_len, n_test = (200, 16, 16) if tiny else (4000, 48, 1000)
    src, tgt = [_tokens(es) for es, _ in pairs], [_tokens(en) for _, en in pairs]
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    train_ix = perm[n_test:].tolist()

    def vocab(sents: list[list[str]]) -> dict[str, int]:
        counts = Counter(w for i in train_ix for w in sents[i])
        return {w: i + 4 for i, (w, _) in enumerate(counts.most_common(vocab_size - 4))}

    return {
        "src": _encode(src, vocab(src), max_len, bos=False)[:, :max_len],
        "tgt": _encode(tgt, vocab(tgt), max_len, bos=True),  # BOS … EOS; inputs [:-1], targets [1:]
        "train": perm[n_test:],
        "test": perm[:n_test],
        "vocab": vocab_size,
        "max_len": max_len,
    }


def build_translate(tiny: bool, device: torch.device) -> Problem:
    d = _bible(tiny, data.cache_key())
    batch = 8 if tiny else 64
    dim, heads, layers = (16, 2, 1) if tiny else (128, 4, 2)
    model = models.Translator(d["vocab"], d["vocab"], d["max_len"], dim, heads, layers).to(device)

    def rows(idx: Tensor) -> Batch:
        src, tgt = d["src"][idx], d["tgt"][idx]
        ls, lt = int((src != PAD).sum(1).max()), int((tgt != PAD).sum(1).max())
        return _on(device, src[:, :ls], tgt[:, : lt - 1], tgt[:, 1:lt])

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        for i in epoch_batches(len(d["train"]), batch, gen):
            yield rows(d["train"][i])

    def loss_sum(m: nn.Module, b: Batch) -> tuple[Tensor, int]:
        logits = m(b[0], b[1], PAD)
        return F.cross_entropy(logits.flatten(0, 1), b[2].flatten(), ignore_index=PAD, reduction="sum"), int(
            (b[2] != PAD).sum()
        )

    def loss(m: nn.Module, b: Batch) -> Tensor:
        total, count = loss_sum(m, b)
        return total / count

    def evaluate(m: nn.Module) -> float:
        chunks = (rows(d["test"][s]) for s in _chunks(len(d["test"]), 250))
        return _mean_over(m, chunks, lambda m, b: (lambda t, c: (float(t), c))(*loss_sum(m, b)))

    return Problem(model, batches, loss, evaluate)


# --------------------------------------------------------------------------- the registry
def _per_epoch(train_size: Callable[[bool], int], batch: Callable[[bool], int]) -> Callable[[bool], int]:
    return lambda tiny: train_size(tiny) // batch(tiny)


TASKS: dict[str, Task] = {
    "lm": Task(
        "lm",
        "char-level GPT (4 layers, d=128, 4 heads, ctx 128, batch 32) on Shakespeare",
        "val loss (nats/char)",
        False,
        build_lm,
        _per_epoch(lambda t: len(_corpus(t, data.cache_key()).train), lambda t: 16 * 4 if t else 128 * 32),
        default_steps=200,
        eval_every=20,
        weight_decay=0.01,
        lrs={"shampoo": 6e-3, "adamw": 1.2e-2},
    ),
    "image": Task(
        "image",
        "ResNet (stem 16, BasicBlocks 16/32/64, batch 128) on Fashion-MNIST",
        "test accuracy",
        True,
        build_image,
        _per_epoch(lambda t: len(_fashion(t, data.cache_key()).train_y), lambda t: 32 if t else 128),
        default_steps=3 * 468,
        eval_every=117,
        weight_decay=0.01,
        lrs={"shampoo": 4e-3, "adamw": 4e-3, "sgd": 0.05},
        optimizers=("shampoo", "adamw", "sgd"),
    ),
    "ctr": Task(
        "ctr",
        "DLRM (6 tables of dim 32, pairwise dots, top MLP 256-128-1, batch 256) on MovieLens-100k",
        "test logloss",
        False,
        build_ctr,
        _per_epoch(lambda t: len(_clicks(t, data.cache_key())[1]), lambda t: 64 if t else 256),
        default_steps=6 * 312,
        eval_every=156,
        weight_decay=0.01,
        lrs={"shampoo": 3e-3, "adamw": 3e-3},
        embedding_groups=True,
        secondary_metric="test AUC",
    ),
    "ctr_onepass": Task(
        "ctr_onepass",
        "DLRM as ctr, one pass over the training data (each example seen once, as on Criteo)",
        "test logloss",
        False,
        build_ctr,
        _per_epoch(lambda t: len(_clicks(t, data.cache_key())[1]), lambda t: 64 if t else 256),
        default_steps=312,
        eval_every=26,
        weight_decay=0.01,
        lrs={"shampoo": 3e-3, "adamw": 3e-3},
        embedding_groups=True,
        secondary_metric="test AUC",
    ),
    "autoencoder": Task(
        "autoencoder",
        "MNIST autoencoder 784-1000-500-250-30 (tanh, mirrored decoder, batch 1000)",
        "test BCE per image",
        False,
        build_autoencoder,
        _per_epoch(lambda t: len(_mnist(t, data.cache_key())[0]), lambda t: 64 if t else 1000),
        default_steps=10 * 50,
        eval_every=25,
        weight_decay=0.01,
        lrs={"shampoo": 3e-3, "adamw": 1e-3},
    ),
    "translate": Task(
        "translate",
        "nn.Transformer 2+2 layers, d=128, 4k words per side, Spanish RV1909 → English KJV, batch 64",
        "test cross-entropy (nats/word)",
        False,
        build_translate,
        _per_epoch(lambda t: len(_bible(t, data.cache_key())["train"]), lambda t: 8 if t else 64),
        default_steps=600,
        eval_every=50,
        weight_decay=0.01,
        lrs={"shampoo": 2e-3, "adamw": 2e-3},
    ),
}
