"""Embedded offline datasets: mnist1d built from its templates, scikit-learn's digits.

Nothing here touches the network: mnist1d's ``make_dataset`` synthesizes the data
from templates shipped in the package (its ``get_dataset`` would download).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors. ``X`` is float32 ``[N, features]``; ``y`` int64 class labels."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def loader(self, batch_size: int = 1000, *, train: bool = True, shuffle: bool = False,
               seed: int = 0) -> DataLoader:
        """A ``DataLoader`` over the train (or test) split."""
        X, y = (self.X_train, self.y_train) if train else (self.X_test, self.y_test)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle, generator=g)

    def batches(self, batch_size: int = 1000, *, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split cut into consecutive in-memory batches (the last may be short)."""
        X, y = (self.X_train, self.y_train) if train else (self.X_test, self.y_test)
        return list(zip(X.split(batch_size), y.split(batch_size)))


@lru_cache(maxsize=4)
def mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """The MNIST-1D dataset (Greydanus, 2020): 40-feature 1-D digit signals, 10 classes.

    Built offline from the package's templates. The defaults give the standard
    4000 training and 1000 test samples; larger ``num_samples`` makes more.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    d = make_dataset(args)
    return Dataset(
        X_train=torch.as_tensor(np.asarray(d["x"]), dtype=torch.float32),
        y_train=torch.as_tensor(np.asarray(d["y"]), dtype=torch.int64),
        X_test=torch.as_tensor(np.asarray(d["x_test"]), dtype=torch.float32),
        y_test=torch.as_tensor(np.asarray(d["y_test"]), dtype=torch.int64),
        num_classes=10,
    )


@lru_cache(maxsize=2)
def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 samples, 64 features scaled to [0, 1], 10 classes)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    X, y = X[perm] / 16.0, y[perm]
    n_test = int(round(test_fraction * len(y)))
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    return Dataset(Xt[n_test:], yt[n_test:], Xt[:n_test], yt[:n_test], num_classes=10)
