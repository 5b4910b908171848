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


COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def image_folder(root, per_class: int = 24, test_per_class: int = 8, size: int = 16, classes: int = 3):
    """A tiny ImageNet-layout folder of PNGs: one colour per class, with noise, so it is learnable."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", test_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
