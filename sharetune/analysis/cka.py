"""Linear CKA (Kornblith et al. 2019) with the minibatch, unbiased HSIC of Nguyen et al. (2021).

HSIC is accumulated over minibatches in float64, so CKA of large activations over a whole dataset
fits in memory and stays numerically stable. SPIN (Figures 3, 4, 7, 8) uses it to see which layers
are similar; `sharetune.models.spin.cka_plan` turns that into a sharing plan (SPIN's `mapping: cka`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sharetune.analysis.figures import save_figure

MIN_HSIC_SAMPLES = 4  # unbiased HSIC divides by n - 3


def _unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    if n < MIN_HSIC_SAMPLES:
        raise ValueError(f"batch_size: unbiased HSIC needs at least {MIN_HSIC_SAMPLES} samples per batch, got {n}")
    k = k - torch.diag(torch.diag(k))
    l = l - torch.diag(torch.diag(l))
    kl = k @ l
    return (kl.trace() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (n * (n - 3))


class _Accumulator:
    """Running HSIC sums for every pair of a list of representations."""

    def __init__(self, rows: int, cols: int) -> None:
        self.cross = torch.zeros(rows, cols, dtype=torch.float64)
        self.self_rows = torch.zeros(rows, dtype=torch.float64)
        self.self_cols = torch.zeros(cols, dtype=torch.float64)

    def add(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        grams_x = [f.flatten(1).double() @ f.flatten(1).double().T for f in xs]
        grams_y = grams_x if ys is xs else [f.flatten(1).double() @ f.flatten(1).double().T for f in ys]
        for i, kx in enumerate(grams_x):
            self.self_rows[i] += _unbiased_hsic(kx, kx)
            for j, ly in enumerate(grams_y):
                self.cross[i, j] += _unbiased_hsic(kx, ly)
        for j, ly in enumerate(grams_y):
            self.self_cols[j] += _unbiased_hsic(ly, ly)

    def cka(self) -> Tensor:
        return self.cross / torch.sqrt(self.self_rows[:, None] * self.self_cols[None, :])


def linear_cka(batches_x: Iterable[Tensor], batches_y: Iterable[Tensor]) -> float:
    """CKA between two representations given as matching minibatches (samples first)."""
    acc = _Accumulator(1, 1)
    for x, y in zip(batches_x, batches_y):
        acc.add([x], [y])
    return float(acc.cka()[0, 0])


def _block_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    outputs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for b in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@torch.no_grad()
def cka_matrix(model_a: nn.Module, batches: Iterable[Tensor], model_b: nn.Module | None = None) -> np.ndarray:
    """CKA between the outputs of the blocks (`model.blocks`) of `model_a` and `model_b` (default:
    `model_a` itself), in eval mode; each model is left in the mode it was in (a cka mapping goes on
    to train its model)."""
    modes = [(model, model.training) for model in (model_a, model_b) if model is not None]
    acc = None
    try:
        for model, _ in modes:
            model.eval()
        for x in batches:
            xs = _block_outputs(model_a, x)
            ys = xs if model_b is None else _block_outputs(model_b, x)
            acc = acc or _Accumulator(len(xs), len(ys))
            acc.add(xs, ys)
    finally:
        for model, training in modes:
            model.train(training)
    if acc is None:
        raise ValueError("batches: no data given")
    return acc.cka().numpy()


def plot_cka(matrix: np.ndarray, path: str | Path, title: str = "Linear CKA between layers") -> Path:
    """Save a heatmap like SPIN's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="CKA")
    return save_figure(fig, path)
