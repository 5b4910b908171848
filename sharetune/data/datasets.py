"""Dataset registry: torchvision's image sets, MNIST-1D and a synthetic set for tests.

Every dataset loads fully into memory as float32 tensors, normalised with the dataset's own
statistics, so a training loop slices batches from memory instead of running a DataLoader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

DEFAULT_ROOT = Path(os.environ.get("SHARETUNE_DATA", "data"))  # images point this at a mounted volume
DEFAULT_DATASET = "mnist"


class DataError(RuntimeError):
    """A dataset problem the user can fix; the message says how."""


@dataclass
class TensorData:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


Loader = Callable[[Path, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]
DATASETS: dict[str, Loader] = {}
# Per-channel mean and std of each training set (the values the field uses).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _register(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def torchvision_loader(name: str, cls_name: str, classes: int) -> Loader:
    def loader(root: Path, seed: int):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            train, test = cls(str(root), train=True), cls(str(root), train=False)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            raise DataError(
                f"{name}: files not found or unreadable under {root} ({err}). "
                f"Fix: run `sharetune data fetch {name} --root {root}`."
            ) from None
        return _images(train.data), np.asarray(train.targets), _images(test.data), np.asarray(test.targets), classes

    return loader


def _images(data) -> np.ndarray:
    """torchvision keeps MNIST-likes as N x H x W tensors and CIFAR as N x H x W x C arrays."""
    array = np.asarray(data, dtype=np.float32) / 255.0
    return array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)


# torchvision's image sets: name -> (torchvision class, classes); `fetch` downloads the same ones
TORCHVISION_SETS = {
    "mnist": ("MNIST", 10),
    "fashion_mnist": ("FashionMNIST", 10),
    "kmnist": ("KMNIST", 10),
    "cifar10": ("CIFAR10", 10),
    "cifar100": ("CIFAR100", 100),
}
for _name, (_cls, _classes) in TORCHVISION_SETS.items():
    _register(_name)(torchvision_loader(_name, _cls, _classes))


@_register("mnist1d")
def _mnist1d(root: Path, seed: int):
    """MNIST-1D (Greydanus 2020), generated offline from its templates; 40 features, 10 classes."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42 + seed
    data = make_dataset(args)
    return data["x"], data["y"], data["x_test"], data["y_test"], 10


@_register("synthetic")
def _synthetic(root: Path, seed: int, n_train: int = 512, n_test: int = 256, classes: int = 4):
    """Learnable 1x8x8 images: a fixed random pattern per class plus noise. For tests and smoke runs."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(classes, 1, 8, 8)).astype(np.float32)

    def sample(n: int):
        y = rng.integers(0, classes, n)
        return patterns[y] + rng.normal(scale=1.0, size=(n, 1, 8, 8)).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = sample(n_train), sample(n_test)
    return x_train, y_train, x_test, y_test, classes


def canonical_name(name: str, field: str = "dataset") -> str:
    """The registry's key for `name` (any case, - or _); DataError naming `field` if unknown."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise DataError(f"{field}: unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    return key


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int = 0) -> Tensor:
    """Replace exactly round(fraction * n) labels, chosen by `seed`, with a different random class."""
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"label_noise: must be in [0, 1], got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=gen)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def _normalise(name: str, x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    if name in _STATS:
        mean, std = (torch.tensor(v).view(1, -1, *([1] * (x_train.dim() - 2))) for v in _STATS[name])
    else:  # computed on the training split only, so test data never leaks into it
        mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def load(
    name: str, root: str | Path | None = None, *, label_noise: float = 0.0, seed: int = 0,
    train_subset: int | None = None, test_subset: int | None = None,
) -> TensorData:
    """Load `name` into memory: normalised float32 inputs and int64 labels, train and test splits;
    `train_subset`/`test_subset` keep the first N examples of each (reduced scale)."""
    key = canonical_name(name)
    root = Path(root) if root is not None else DEFAULT_ROOT
    if root.exists() and not root.is_dir():
        raise DataError(f"root: {root} is not a directory. Fix: pass --data-dir pointing to a folder.")
    x_train, y_train, x_test, y_test, classes = DATASETS[key](root, seed)
    x_train, x_test = _normalise(key, torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32))
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    if label_noise:
        y_train = add_label_noise(y_train, label_noise, classes, seed)
    y_test = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    train, test = slice(0, train_subset), slice(0, test_subset)
    return TensorData(key, x_train[train].contiguous(), y_train[train], x_test[test].contiguous(), y_test[test], classes)
