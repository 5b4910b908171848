"""Datasets as in-memory tensors: `load(name)` once, then train from memory."""

from sharetune.data.datasets import DATASETS, DEFAULT_DATASET, DEFAULT_ROOT, DataError, TensorData, canonical_name, load
from sharetune.data.fetch import fetch

__all__ = ["DATASETS", "DEFAULT_DATASET", "DEFAULT_ROOT", "DataError", "TensorData", "canonical_name", "fetch", "load"]
