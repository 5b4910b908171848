"""What a training loop asks of a dataset, whether it lives in memory or streams from disk.

`TensorData` (in memory) and `ImageFolderData` (files, through a DataLoader) both answer these
calls, so models and recipes never care where batches come from. Each epoch's order depends only on
the seed and the epoch, so a resumed trial sees the batches it would have seen, and the workers of a
data-parallel trial (`shard`) each take their part of the same batches.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """Per-image augmentation for training batches (folder sets decode and augment in the loader's
    workers; in-memory image tensors take random erasing only: RandAugment needs decoded images)."""

    randaugment: str | None = None  # timm's RandAugment config, e.g. rand-m9-mstd0.5-inc1
    random_erasing: float = 0.0  # probability per image


PIXEL_MAX = 255.0  # an 8-bit pixel's largest value


@dataclass(frozen=True)
class Preprocessing:
    """How a raw example becomes what a model trained on this data reads, as plain values that an
    exported model carries (a model is useless to someone who cannot feed it what it trained on).
    An image (`mode`: the PIL mode it is converted to, so an RGB image of a digit reads as MNIST's
    grey) has its shorter side resized to `resize` and its centre cropped to `crop` where they are
    given, and must then be `size` (height, width); every value is divided by `max_value` (255:
    8-bit pixels to [0, 1]) and normalised per channel by `mean` and `std`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float = PIXEL_MAX
    mode: str | None = None  # "L" or "RGB" for images; None: the raw values are features (MNIST-1D)
    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"
    size: tuple[int, int] | None = None  # an image's (height, width) as the model takes it

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "size": self.size and list(self.size)}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        size = values.get("size")
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"]), "size": size and tuple(size)})

    def __call__(self, raw: Any) -> Tensor:
        """One example as the model reads it (no batch dimension). An image: a PIL image or its file's
        path, or, where nothing is resized, its 8-bit pixels channels first (C x H x W). Features: their
        values as they are. ValueError for pixels in another layout or already scaled (they would be
        normalised wrongly, and the model would answer nonsense) and for an image of another size."""
        if self.mode is not None:
            raw = self._pixels(raw)
        values = torch.as_tensor(raw).to(torch.float32) / self.max_value
        shape = (-1, *[1] * (values.dim() - 1)) if len(self.mean) > 1 else (1,)
        return (values - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def _pixels(self, raw: Any) -> Tensor:
        """An image's 8-bit pixels, C x H x W at the model's size: decoded, resized and cropped as recorded."""
        if isinstance(raw, (Tensor, np.ndarray)):
            shape, channels = tuple(raw.shape), len(self.mean)
            if self.resize is not None or self.crop is not None or len(shape) != 3 or shape[0] != channels:
                raise ValueError(f"got an array of shape {shape}; give a PIL image"
                                 + ("" if self.resize is not None or self.crop is not None else
                                    f", or {channels} x H x W pixels (channels first)"))
            pixels = torch.as_tensor(raw)
            if pixels.is_floating_point():
                raise ValueError(f"got {str(raw.dtype).removeprefix('torch.')} values; give the 8-bit pixels (0 to {self.max_value:g}), which this "
                                 "preprocessing scales itself")
        else:
            from PIL import Image
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as F

            if isinstance(raw, (str, PurePath)):
                with Image.open(raw) as opened:
                    image = opened.convert(self.mode)
            else:
                image = raw.convert(self.mode)
            if self.resize is not None:
                image = F.resize(image, self.resize, InterpolationMode(self.interpolation))
            if self.crop is not None:
                image = F.center_crop(image, self.crop)
            pixels = F.pil_to_tensor(image)
        if self.size is not None and tuple(pixels.shape[-2:]) != self.size:
            raise ValueError(f"got a {pixels.shape[-2]} x {pixels.shape[-1]} image; the model takes {self.size[0]} x "
                             f"{self.size[1]} (resize it first)")
        return pixels


class Batches(Protocol):
    name: str
    num_classes: int
    # What the files read from disk are, in one line (each split's count and one hash of them), as listed
    # where the search opened them: a node whose copy differs, or a resume after they changed, is refused.
    # None for sets in memory, which every trial gets from the driver.
    listing: str | None

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How raw examples became these inputs; None for inputs made in memory (tests' tensors)."""

    def splits(self) -> tuple[str, ...]:
        """The evaluated splits: "val" (held out of train for selection) where there is one, and "test"."""

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def train_batches(self, epoch: int, batch_size: int, seed: int, device: torch.device, *,
                      augment: Augment = Augment(), workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...

    def eval_batches(self, split: str, device: torch.device, *, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...

    def sample_inputs(self, count: int) -> Tensor: ...

    def class_names(self) -> list[str]:
        """Each label's name, in label order (what an exported model's outputs mean)."""

    def unreadable(self) -> int | None:
        """Files read so far that could not be decoded, and so were skipped; None for sets in memory."""

    def upscaling_note(self, sizes: Iterable[int | None] = (None,)) -> str | None:
        """A line where images stored smaller than the largest of `sizes` (resolutions they are decoded at;
        None: the data's own) would be enlarged to it, which costs many times the compute and adds
        nothing; None otherwise, and for sets in memory."""

    def with_resolution(self, size: int | None) -> "Batches": ...

    def shard(self, rank: int, world: int) -> "Batches":
        """Rank `rank` of `world` data-parallel workers' share: of every training batch (`batch_size`
        stays the whole step's) and of every evaluated split, so that the ranks' shares add up to it."""


def share(count: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous part of `count` items split `world` ways (sizes differ by at most one)."""
    return slice(count * rank // world, count * (rank + 1) // world)


def batch_starts(size: int, batch_size: int, world: int) -> range:
    """Where an epoch's batches start. A short last batch that would leave some worker fewer than two
    examples is dropped (BatchNorm cannot train on one); a full batch is always kept (the search
    refuses a batch smaller than two examples per worker), and so is a first one."""
    end = size - size % batch_size if 0 < size % batch_size < 2 * world and size > batch_size else size
    return range(0, end, batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """What an epoch's randomness is seeded with: the run's seed and the epoch alone, distinct for
    every epoch of every seed."""
    return seed * 1_000_003 + epoch


def seed_host_generators(value: int) -> None:
    """Seed the host's generators that random pieces draw from: Python's, NumPy's (its legacy one takes
    32 bits) and torch's CPU one (torch.manual_seed also seeds every device's, and costs 100 times more)."""
    value %= 2**32
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def host_generators_seeded(value: int) -> Iterator[None]:
    """The host's generators seeded by `value` inside, as they were outside: an image decoded in the
    training process itself (no loader workers) leaves the epoch's draws (MixUp, dropout) as they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_host_generators(value)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def image_seed(epoch_value: int, index: int) -> int:
    """What one image's augmentation draws from in an epoch (`epoch_value`: `epoch_seed`'s): the same
    whichever loader worker, rank or resumed run decodes it."""
    return int(np.random.SeedSequence((epoch_value, index)).generate_state(1)[0])


def epoch_order(size: int, seed: int, epoch: int) -> Tensor:
    """The training examples' order in `epoch`: a permutation seeded by (seed, epoch) alone."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, held out): round(fraction x n_c) examples of every class c, chosen by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(fraction * len(members))
        held.append(members[:count])
        train.append(members[count:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values
