"""Datasets: the small sets as in-memory tensors, ImageNet-style folders streamed from disk; both
answer the calls in `sharetune.data.batches`, so a training loop takes either."""

from sharetune.data.batches import Augment, Batches, Preprocessing, epoch_seed, seed_host_generators, stratified_split
from sharetune.data.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    DEFAULT_IMG_SIZE,
    DEFAULT_ROOT,
    DEFAULT_VAL_FRACTION,
    FOLDER,
    GENERATED,
    DataError,
    TensorData,
    canonical_name,
    data_root,
    dataset_names,
    load,
)
from sharetune.data.fetch import fetch
from sharetune.data.folders import ImageFolderData

__all__ = [
    "DATASETS", "DEFAULT_DATASET", "DEFAULT_IMG_SIZE", "DEFAULT_ROOT", "DEFAULT_VAL_FRACTION", "FOLDER", "GENERATED", "Augment", "Batches", "DataError",
    "ImageFolderData", "Preprocessing", "TensorData", "canonical_name", "data_root", "dataset_names", "epoch_seed", "fetch", "load",
    "seed_host_generators", "stratified_split",
]
