"""ImageNet-style folders streamed from disk: root/train/<class>/<images>, root/val/<class>/...

The layout is checked once where the search starts (before Ray); each trial lists the files again
on its own node (a shared filesystem, or a local copy per node) and streams them through a
DataLoader whose worker processes decode and augment (timm's transforms). Nothing of it travels
through Ray's object store. The folder's val/ is the test split (as ImageNet's is used); the val
split for selection is a stratified share of train/.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from sharetune.data.batches import (
    Augment,
    Preprocessing,
    batch_starts,
    epoch_order,
    epoch_seed,
    host_generators_seeded,
    image_seed,
    seed_host_generators,
    share,
)
from sharetune.data.datasets import EVAL_BATCH, FOLDER, DataError, val_split

LAYOUT = ("an image folder needs root/train/<class>/<images> and root/val/<class>/<images> "
          "(root: data.root, or --data-dir for sharetune train)")


def shown(path: str) -> str:
    """A file's path as a line can show it: bytes of a name that are not UTF-8 as \\xNN (printing them
    raised UnicodeEncodeError)."""
    return path.encode(errors="surrogateescape").decode(errors="backslashreplace")


def _hidden(name: str) -> bool:
    """A dot name (.ipynb_checkpoints, macOS's ._x.jpg, .DS_Store) is a tool's, not a class or an image."""
    return name.startswith(".")


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; {LAYOUT}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not _hidden(entry.name))
    if not classes:
        raise DataError(f"{folder}: no class folders; {LAYOUT}")
    return classes


def _images(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """A class folder's image files, its sub-folders' too: what torchvision's `ImageFolder` reads from
    it (any case of its extensions, links followed), hidden ones left out."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not _hidden(name)]  # os.walk descends into what is left
        found += [os.path.join(parent, name) for name in files if not _hidden(name) and name.lower().endswith(extensions)]
    return sorted(found)


def _files(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image, the classes interleaved, so that the first N hold them all alike."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # here: importing torchvision takes every command a second

    per_class = []
    for label, name in enumerate(classes):
        images = _images(folder / name, IMG_EXTENSIONS)
        if not images:
            raise DataError(f"{folder / name}: an empty class folder (no file ending in {', '.join(IMG_EXTENSIONS)}, in any "
                            "case, in it or its sub-folders); add its images or remove it")
        per_class.append([(path, label) for path in images])
    return [item for row in itertools.zip_longest(*per_class) for item in row if item is not None]


def _listing(root: Path, lists: dict[str, list[tuple[str, int]]]) -> str:
    """Each split's count, and one hash of every file (its path from `root`) and label, in order."""
    digest, start = hashlib.sha256(), len(str(root)) + 1
    for split, files in lists.items():
        for path, label in files:
            digest.update(f"{split}/{path[start:]}\0{label}\n".encode(errors="surrogateescape"))  # names need not be UTF-8
    return f"{', '.join(f'{split} {len(files)}' for split, files in lists.items())} images; sha256 {digest.hexdigest()[:16]}"


class _Images(Dataset):
    """Decodes and transforms one file; an unreadable one comes back as its path, to be counted. A
    training item, `(index, epoch_value)`, is augmented from `image_seed` alone: the same in every
    loader worker, rank and resumed run (a worker's own generators depend on how many there are and
    on when a persistent one started)."""

    def __init__(self, files: list[tuple[str, int]], transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]):
        index, epoch_value = item if isinstance(item, tuple) else (item, None)
        path, label = self.files[index]
        try:
            with Image.open(path) as image:
                decoded = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not an image we can read
            return path
        if epoch_value is None:
            return self.transform(decoded), label
        seed = image_seed(epoch_value, index)
        if get_worker_info() is None:  # in the training process: its own draws go on afterwards
            with host_generators_seeded(seed):
                return self.transform(decoded), label
        seed_host_generators(seed)  # a loader worker's generators serve its images alone
        return self.transform(decoded), label


def _collate(items: list) -> tuple[Tensor, Tensor, list[str]]:
    good = [item for item in items if isinstance(item, tuple)]
    bad = [item for item in items if isinstance(item, str)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


class _EpochBatches(Sampler):
    """A distributed batch sampler: the epoch's seeded order cut into batches of `batch_size`, and of
    each batch the rank's share, so `world` workers step through the single process's batches
    together. Seed and epoch are set before each epoch, so persistent workers keep running; each
    index goes with the epoch's seed, which its augmentation draws from (`_Images`)."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.epoch = 0, 0

    def __iter__(self):
        order, epoch_value = epoch_order(self.size, self.seed, self.epoch).tolist(), epoch_seed(self.seed, self.epoch)
        for start in batch_starts(self.size, self.batch_size, self.world):
            batch = order[start : start + self.batch_size]
            yield [(index, epoch_value) for index in batch[share(len(batch), self.rank, self.world)]]


@dataclass
class ImageFolderData:
    """An ImageNet-layout folder; picklable and small (the file lists are made on each node)."""

    root: Path
    classes: list[str]
    img_size: int  # these as `load` gives them
    val_fraction: float
    seed: int
    workers: int | None  # DataLoader workers; None: the caller's (a trial's CPUs)
    train_subset: int | None
    test_subset: int | None
    name: str = FOLDER
    rank: int = 0  # a data-parallel worker's share (see shard)
    world: int = 1
    listing: str | None = None  # the files' listing where the search opened the folder, which each node's must equal
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # file lists, loaders
    skipped: set = field(default_factory=set, repr=False, compare=False)  # unreadable files seen

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}, "skipped": set()}

    @classmethod
    def open(cls, root: str | Path, **options) -> "ImageFolderData":
        """Check the layout (both splits, the same classes, two or more, no empty class folder) and list it once."""
        root = Path(root)
        train, val = _classes(root / "train"), _classes(root / "val")
        if train != val:
            missing = sorted(set(train) ^ set(val))
            raise DataError(f"{root}: train/ and val/ hold different classes (e.g. {missing[0]!r}); "
                            f"give both splits the same class folders")
        if len(train) == 1:  # it would train to loss 0 and accuracy 1, having nothing to tell apart
            raise DataError(f"{root}: train/ and val/ hold one class folder ({train[0]!r}); a classifier needs at least "
                            "two classes: add a folder for each of the others")
        data = cls(root, train, **options)
        data.listing = _listing(root, data._lists())
        return data

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.img_size, self.img_size)

    @property
    def preprocessing(self) -> Preprocessing:
        """The evaluation transform, which val and test images go through, as plain values."""
        resize, crop, _, normalise = self._transform(None).transforms
        return Preprocessing(tuple(normalise.mean.tolist()), tuple(normalise.std.tolist()), mode="RGB", resize=resize.size,
                             crop=crop.size[0], interpolation=resize.interpolation.value, size=tuple(crop.size))

    def splits(self) -> tuple[str, ...]:
        return ("val", "test") if self.val_fraction else ("test",)

    def _lists(self) -> dict[str, list[tuple[str, int]]]:
        if "lists" not in self._cache:
            train = _files(self.root / "train", self.classes)[: self.train_subset]
            test = _files(self.root / "val", self.classes)[: self.test_subset]
            lists = {"train": train, "test": test}
            if self.val_fraction:
                kept, held = val_split(torch.tensor([label for _, label in train]), self.val_fraction, self.seed)
                lists = {"train": [train[i] for i in kept.tolist()], "val": [train[i] for i in held.tolist()], "test": test}
            if self.listing is not None and (here := _listing(self.root, lists)) != self.listing:
                raise DataError(f"{self.root}: its files on {socket.gethostname()} ({here}) are not those the search listed "
                                f"where it started ({self.listing}); give every node the same copy, unchanged while "
                                "the search runs")
            self._cache["lists"] = lists
        return self._cache["lists"]

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(batch_starts(len(self._lists()["train"]), batch_size, self.world))

    def _loader(self, split: str, batch_size: int, device: torch.device, workers: int, augment: Augment | None) -> DataLoader:
        key = (split, batch_size, str(device), workers, augment)
        if key not in self._cache:
            training = augment is not None
            transform = self._transform(augment)
            files = self._lists()[split]
            workers = self.workers if self.workers is not None else workers
            if training:
                batching = {"batch_sampler": _EpochBatches(len(files), batch_size, self.rank, self.world)}
            else:
                files, batching = files[share(len(files), self.rank, self.world)], {"batch_size": batch_size}
            self._cache[key] = DataLoader(
                _Images(files, transform), collate_fn=_collate, num_workers=workers, **batching,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            )
        return self._cache[key]

    def _transform(self, augment: Augment | None):
        """timm's transform: training's with `augment`, else evaluation's (resize, centre crop, normalise)."""
        from timm.data import create_transform

        return create_transform(self.img_size, is_training=augment is not None, **(
            {"auto_augment": augment.randaugment, "re_prob": augment.random_erasing, "re_mode": "pixel"} if augment is not None else {}))

    def _stream(self, loader: DataLoader, split: str, device: torch.device, *,
                every_step: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """The loader's batches less their unreadable images; a batch of none is dropped, unless
        `every_step`: the ranks of a data-parallel run must take every step together (a rank that
        skipped one would leave the others waiting in the gradients' all-reduce), so it trains on
        its last readable share again."""
        known, served = set(self.skipped), False
        for x, y, bad in loader:
            self.skipped.update(bad)
            if every_step:
                if len(x):
                    self._cache["last_share"] = x, y
                elif "last_share" in self._cache:
                    x, y = self._cache["last_share"]
                else:
                    raise DataError(f"{self.root}: every image of rank {self.rank}'s share of its first batch is unreadable "
                                    f"(e.g. {shown(bad[0])}); replace or remove them")
            elif not len(x):
                continue
            served = True
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not served and self.skipped - known:  # an accuracy over none would divide by zero
            raise DataError(f"{self.root}: every image of the {split} split is unreadable (e.g. {shown(min(self.skipped - known))}); "
                            "replace or remove them")
        if self.skipped - known:
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} unreadable images so far "
                          f"(e.g. {shown(min(self.skipped - known))}); replace or remove them", stacklevel=3)

    def train_batches(self, epoch: int, batch_size: int, seed: int, device: torch.device, *,
                      augment: Augment = Augment(), workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        loader = self._loader("train", batch_size, device, workers, augment)
        loader.batch_sampler.seed, loader.batch_sampler.epoch = seed, epoch
        yield from self._stream(loader, "train", device, every_step=self.world > 1)

    def eval_batches(self, split: str, device: torch.device, *, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        yield from self._stream(self._loader(split, EVAL_BATCH, device, workers, None), split, device)

    def unreadable(self) -> int:
        return len(self.skipped)

    def class_names(self) -> list[str]:
        return list(self.classes)  # the class folders, sorted

    def upscaling_note(self, sizes: Iterable[int | None] = (None,)) -> str | None:
        largest = max(size or self.img_size for size in sizes)
        try:
            with Image.open(self._lists()["train"][0][0]) as first:  # its header only
                width, height = first.size
        except (OSError, ValueError, SyntaxError, IndexError, Image.DecompressionBombError):
            return None  # counted as unreadable when training reads it
        if max(width, height) >= largest:
            return None
        return (f"{self.root}: its images are {width} x {height} (the first one), decoded at {largest} x {largest}: "
                f"{largest ** 2 / (width * height):.0f} times the pixels to compute; img_size {max(width, height)} "
                "trains at their size")

    def _copy(self, **changes) -> "ImageFolderData":
        """The same files, read otherwise: listed once (a walk of the whole folder), not once per copy."""
        return replace(self, **{"skipped": set(), **changes}, _cache={"lists": self._lists()})

    def with_resolution(self, size: int | None) -> "ImageFolderData":
        """The same folder decoded at `size` (a trial's resolution: SPIN Table 4), or as it is."""
        return self if size is None or size == self.img_size else self._copy(img_size=size)

    def shard(self, rank: int, world: int) -> "ImageFolderData":
        return self._copy(rank=rank, world=world)

    def sample_inputs(self, count: int) -> Tensor:
        """The first `count` training images (the classes interleaved), as evaluation sees them; the same
        on every rank of a data-parallel trial (each builds the same sharing plan from them)."""
        cpu, whole = torch.device("cpu"), self._copy(rank=0, world=1, skipped=self.skipped)  # its unreadable ones count
        x, _ = next(whole._stream(whole._loader("train", count, cpu, 0, None), "train", cpu))
        return x
