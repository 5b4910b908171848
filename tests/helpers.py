"""Tiny specs for tests (synthetic data, small nets, a handful of epochs), and the devices to test on."""

import pytest
import torch

# CUDA runs where a GPU is present, and shows as skipped elsewhere
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny", "family": "arbnet", "data": {"name": "synthetic"},
        "fixed": {"table_size": 64, "epochs": 2, "hidden": [16]},
        "dimensions": {"hash": {"choice": ["uniform", "dirichlet"]}, "alpha": {"loguniform": [0.01, 10.0]}},
        "objectives": {"test_accuracy": "max"},
        "budget": {"num_samples": 4, "max_concurrent": 2},
    }
    spec.update(changes)
    return spec
