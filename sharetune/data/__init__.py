"""Datasets as in-memory tensors: `load(name)` once, then train from memory."""

from sharetune.data.datasets import DATASETS, DataError, TensorData, canonical_name, load
from sharetune.data.fetch import fetch

__all__ = ["DATASETS", "DataError", "TensorData", "canonical_name", "fetch", "load"]
