"""Dataset registry: torchvision's image sets, MNIST-1D, a synthetic set for tests, and ImageNet-style
folders (sharetune.data.folders).

The small sets load fully into memory as float32 tensors, normalised with the dataset's own
statistics, so a training loop slices batches from memory instead of running a DataLoader.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from sharetune.data.batches import PIXEL_MAX, Augment, Preprocessing, batch_starts, epoch_order, share, stratified_split
from sharetune.errors import first_line

DEFAULT_ROOT = Path(os.environ.get("SHARETUNE_DATA", "data"))  # images point this at a mounted volume
DEFAULT_DATASET = "mnist"
GENERATED = ("mnist1d", "synthetic")  # made from the seed, not read from files
FOLDER = "imagefolder"  # root/train/<class>/<images> and root/val/<class>/...: streamed, not loaded
EVAL_BATCH = 1024
DEFAULT_IMG_SIZE = 224  # an image folder's decoded resolution: ImageNet's, as the SPIN models expect
# Held out of the training set, stratified and seeded, for selection: searching on the test split
# would fit the hyperparameters to it. 0: no val split (select on test_accuracy, as ArbNet did).
DEFAULT_VAL_FRACTION = 0.1


class DataError(RuntimeError):
    """A dataset problem the user can fix; the message says how. `setting`: the `load` argument it is
    about (name, root, label_noise, val_fraction), which each command spells as its users typed it
    (`data.val_fraction` in a spec, `--data-dir` for `train`)."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message, setting)  # both in args: a copy pickled across processes keeps its setting
        self.message, self.setting = message, setting

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}" if self.setting else self.message

    def spelled(self, spell: Callable[[str], str]) -> DataError:
        """The same error, its setting as `spell` names it."""
        return DataError(self.message, spell(self.setting)) if self.setting else self


@dataclass
class TensorData:
    """A dataset in memory: train, test, and (when `val_fraction` held some out) val splits."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    preprocessing: Preprocessing | None = None  # how the raw examples became x (None: made in memory)
    rank: int = 0  # a data-parallel worker's share (see shard)
    world: int = 1
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> its copies
    listing: ClassVar[None] = None  # in memory: every trial gets the driver's copy

    def __getstate__(self) -> dict:
        """Tensors travel as NumPy arrays, which Ray's object store hands to every trial without a copy
        (a tensor is unpickled afresh: about a second per trial for MNIST); device copies stay behind."""
        return {k: v.numpy() if isinstance(v, Tensor) else v for k, v in {**self.__dict__, "_on_device": {}}.items()}

    def __setstate__(self, state: dict) -> None:
        with warnings.catch_warnings(action="ignore", category=UserWarning):  # the store's arrays are read-only;
            tensors = {k: torch.from_numpy(v) for k, v in state.items() if isinstance(v, np.ndarray)}  # nothing writes them
        self.__dict__.update(state, **tensors)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def splits(self) -> tuple[str, ...]:
        return ("val", "test") if self.x_val is not None else ("test",)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(batch_starts(len(self.x_train), batch_size, self.world))

    def _tensors(self, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (split, str(device))
        if key not in self._on_device:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            self._on_device[key] = (x.to(device), y.to(device))
        return self._on_device[key]

    def train_batches(self, epoch: int, batch_size: int, seed: int, device: torch.device, *,
                      augment: Augment = Augment(), workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self._tensors("train", device)
        erase = _eraser(augment.random_erasing, device) if x.dim() == 4 else None
        order = epoch_order(len(x), seed, epoch).to(device)
        for start in batch_starts(len(order), batch_size, self.world):
            batch = order[start : start + batch_size]
            batch = batch[share(len(batch), self.rank, self.world)]
            yield (x[batch] if erase is None else erase(x[batch].clone())), y[batch]

    def eval_batches(self, split: str, device: torch.device, *, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self._tensors(split, device)
        part = share(len(x), self.rank, self.world)
        x, y = x[part], y[part]
        for start in range(0, len(x), EVAL_BATCH):
            yield x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]

    def unreadable(self) -> None:
        return None

    def upscaling_note(self, sizes: Iterable[int | None] = (None,)) -> None:
        return None  # the sets in memory are decoded already; a SPIN img_size resizes them in the model (spin-scaling's way)

    def class_names(self) -> list[str]:
        return [str(label) for label in range(self.num_classes)]  # the sets in memory keep their labels only

    def sample_inputs(self, count: int) -> Tensor:
        return self.x_train[:count]

    def with_resolution(self, size: int | None) -> "TensorData":
        """In memory the images keep their size (a model resizes them: sharetune.trainables.build.Resize)."""
        return self

    def shard(self, rank: int, world: int) -> "TensorData":
        return replace(self, rank=rank, world=world, _on_device={})


def _eraser(probability: float, device: torch.device):
    if not probability:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode="pixel", device=str(device))


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
        except (RuntimeError, OSError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as err:  # missing, cut short
            reason = first_line(err).split(" You can use download=True")[0]  # no option of ours
            raise DataError(
                f"{name}: files not found or unreadable under {root} ({reason or type(err).__name__}). "
                f"Fix: run `sharetune data fetch {name} --root {root}`."
            ) from None
        return _images(train.data), np.asarray(train.targets), _images(test.data), np.asarray(test.targets), classes

    return loader


def _images(data) -> np.ndarray:
    """torchvision keeps MNIST-likes as N x H x W tensors and CIFAR as N x H x W x C arrays."""
    array = np.asarray(data, dtype=np.float32) / PIXEL_MAX
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
def _synthetic(root: Path, seed: int):
    """Learnable 1x8x8 images: a fixed random pattern per class plus noise. For tests and smoke runs."""
    n_train, n_test, classes = 512, 256, 4
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(classes, 1, 8, 8)).astype(np.float32)

    def sample(n: int):
        y = rng.integers(0, classes, n)
        return patterns[y] + rng.normal(scale=1.0, size=(n, 1, 8, 8)).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = sample(n_train), sample(n_test)
    return x_train, y_train, x_test, y_test, classes


def dataset_names() -> list[str]:
    return sorted([*DATASETS, FOLDER])


def dataset_key(name: str) -> str:
    """How the registry spells `name`: any case, - or _."""
    return name.lower().replace("-", "_")


def canonical_name(name: str, allowed: list[str] | None = None) -> str:
    """The registry's key for `name` (any case, - or _); DataError about `name` naming the `allowed`
    names (default: every dataset) if it is none of them."""
    key, allowed = dataset_key(name), allowed or dataset_names()
    if key not in allowed:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(allowed)}", "name")
    return key


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int = 0) -> Tensor:
    """Replace exactly round(fraction * n) labels, chosen by `seed`, with a different random class."""
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"must be in [0, 1], got {fraction}", "label_noise")
    gen = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=gen)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def _normalise(name: str, x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor, Preprocessing]:
    """Both splits normalised by the training set's statistics (the field's values for the image sets,
    whose pixels `_images` divided by PIXEL_MAX), and that preprocessing as the exported models record it."""
    if name in _STATS:
        mean, std = _STATS[name]
        how = Preprocessing(mean, std, mode={1: "L", 3: "RGB"}[x_train.shape[1]], size=tuple(x_train.shape[2:]))
    else:  # computed on the training split only, so test data never leaks into it
        how = Preprocessing((x_train.mean().item(),), (x_train.std().item(),), max_value=1.0)
    shape = (1, -1, *[1] * (x_train.dim() - 2))
    mean, std = torch.tensor(how.mean).view(shape), torch.tensor(how.std).view(shape)
    return (x_train - mean) / std, (x_test - mean) / std, how


def data_root(root: str | Path | None) -> Path:
    """The folder `root` names from here (None: DEFAULT_ROOT), as an absolute path with `~` expanded."""
    return (Path(root) if root is not None else DEFAULT_ROOT).expanduser().absolute()


def load(
    name: str, root: str | Path | None = None, *, label_noise: float = 0.0, seed: int = 0,
    train_subset: int | None = None, test_subset: int | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
    img_size: int = DEFAULT_IMG_SIZE, workers: int | None = None,
):
    """Open `name`: a TensorData in memory (normalised float32 inputs, int64 labels), or for
    `imagefolder` an ImageFolderData that streams `root` (checked here, read by each trial).
    `train_subset`/`test_subset` keep the first N examples of each split (reduced scale);
    `val_fraction` holds a seeded, stratified share of the training set out as the val split;
    `label_noise` then corrupts that share of the remaining training labels (val and test stay clean:
    they measure the model)."""
    key = canonical_name(name)
    root = data_root(root)  # trials run in Ray's folders
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is not a directory; give a folder", "root")
    if key == FOLDER:
        from sharetune.data.folders import ImageFolderData

        if label_noise:
            raise DataError(f"{label_noise} applies to the sets held in memory; imagefolder's labels are "
                            "its class folders (allowed: 0)", "label_noise")

        return ImageFolderData.open(root, img_size=img_size, val_fraction=val_fraction, seed=seed, workers=workers,
                                    train_subset=train_subset, test_subset=test_subset)
    x_train, y_train, x_test, y_test, classes = DATASETS[key](root, seed)
    x_train, x_test, how = _normalise(key, torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32))
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    y_test = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    train, test = slice(0, train_subset), slice(0, test_subset)
    data = TensorData(key, x_train[train].contiguous(), y_train[train], x_test[test].contiguous(), y_test[test], classes,
                      preprocessing=how)
    data = hold_out(data, val_fraction, seed) if val_fraction else data
    return replace(data, y_train=add_label_noise(data.y_train, label_noise, classes, seed)) if label_noise else data


def val_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The stratified split that holds the val examples out of the training set; DataError where it
    leaves either side empty (a split of nothing has no accuracy)."""
    train, held = stratified_split(labels, fraction, seed)
    if not len(held) or not len(train):
        raise DataError(f"{fraction} of {len(labels)} training examples leaves a split empty; give more training "
                        "examples (train_subset) or another fraction (0: no val split)", "val_fraction")
    return train, held


def hold_out(data: TensorData, fraction: float, seed: int) -> TensorData:
    """`data` with a stratified `fraction` of its training examples moved to the val split."""
    train, val = val_split(data.y_train, fraction, seed)
    return replace(data, x_train=data.x_train[train].contiguous(), y_train=data.y_train[train],
                   x_val=data.x_train[val].contiguous(), y_val=data.y_train[val], _on_device={})
