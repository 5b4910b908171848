"""The ArbNet paper's training recipe (section 4.3), shared by the CLI and every trainable.

SGD (lr 0.1, momentum 0.9); the learning rate drops 10x once training accuracy has not improved
for four epochs; evaluation on the test split after every epoch. `train_epochs` is a generator so
callers (the CLI, Ray Tune trainables) report each epoch as it ends.

`Recipe` owns the training settings and their defaults; every model family's trial settings extend
it (sharetune.spaces.settings), so a trial's settings are its recipe.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from sharetune.data import TensorData
from sharetune.metrics import EpochMetrics


class Recipe(BaseModel):
    """The training recipe's settings, validated (bad values fail with the field's name)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=2)
    weight_decay: float = Field(0.0, ge=0)
    plateau_epochs: int = Field(4, ge=1)  # epochs without a better training accuracy before lr /= 10
    seed: int = Field(0, ge=0)


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / len(x)


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc keep the memory a training step frees, for the next step, instead of returning it.

    Every step frees and reallocates the same tens of MB (ArbNet's gathered weights, autograd's
    weight gradients). With glibc's adaptive defaults some of it goes back to the OS and the next
    step faults it in again: 20 K page faults and a 15-30% slower CIFAR ArbNet step at batch 512.
    This keeps up to 1 GB of freed memory, as jemalloc or tcmalloc would. No-op without glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's most) come from the heap
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give the heap back only past 1 GB free


def train_epochs(
    model: nn.Module,
    data: TensorData,
    recipe: Recipe,
    *,
    device: torch.device | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
    start_epoch: int = 0,
) -> Iterator[EpochMetrics]:
    """Train `model` on `data`, yielding one EpochMetrics per epoch; stops early if the loss diverges.

    Pass the optimizer and scheduler (and `start_epoch`) restored from a checkpoint to resume: each
    epoch's data order depends only on the seed and the epoch, so a resumed run sees the same batches.
    """
    keep_freed_memory()
    device = pick_device(str(device) if device is not None else None)
    model.to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    optimizer = optimizer or make_optimizer(model, recipe)
    scheduler = scheduler or make_scheduler(optimizer, recipe)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
        order = torch.randperm(len(x_train), generator=gen).to(device)
        total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            if len(batch) < 2 and seen:  # BatchNorm cannot train on one sample
                continue
            logits = model(x_train[batch])
            loss = F.cross_entropy(logits, y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(batch)
            correct += (logits.argmax(1) == y_train[batch]).sum()
            seen += len(batch)
        mean_loss = float(total_loss) / seen
        train_accuracy = float(correct) / seen
        diverged = not math.isfinite(mean_loss)
        test_accuracy = 0.0 if diverged else evaluate(model, x_test, y_test)
        scheduler.step(train_accuracy)
        yield EpochMetrics(
            epoch=epoch + 1,
            train_accuracy=train_accuracy,
            test_accuracy=test_accuracy,
            loss=mean_loss,
            lr=optimizer.param_groups[0]["lr"],
            epoch_seconds=time.perf_counter() - started,
            diverged=diverged,
        )
        if diverged:
            return


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    # PyTorch lowers the rate after `patience` bad epochs *plus one*
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=recipe.plateau_epochs - 1)
