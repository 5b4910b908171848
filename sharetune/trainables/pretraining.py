"""The unshared model SPIN's fusion and cka mapping start from: trained once per search, or loaded.

The weights are cached in the search's folder (any `WeightStore`: read/write bytes by file name), so
a resumed search does not pretrain again.
"""

from __future__ import annotations

import io
from typing import Protocol

import torch

from sharetune.data import Batches
from sharetune.spaces import SearchSpec, SpinSettings, trial_settings
from sharetune.trainables.build import build_spin, unwrap
from sharetune.training import train_epochs

PRETRAINED_FILE = "pretrained.pt"


class WeightStore(Protocol):
    def read(self, filename: str) -> bytes | None: ...

    def write(self, filename: str, data: bytes) -> None: ...


def pretrain(settings: SpinSettings, data: Batches) -> dict:
    """Train the unshared network for `pretrain_epochs` with the trial's recipe; its state_dict on CPU."""
    data = data.with_resolution(settings.resolution)
    model = build_spin(settings, data, unshared=True)
    recipe = settings.model_copy(update={"epochs": settings.pretrain_epochs})
    for epoch in train_epochs(model, data, recipe):
        print(f"pretraining the unshared {settings.model}: epoch {epoch.epoch}/{recipe.epochs}, "
              f"test accuracy {epoch.test_accuracy:.4f}", flush=True)
    return {k: v.cpu() for k, v in unwrap(model).state_dict().items()}


def pretrained_weights(spec: SearchSpec, data: Batches, store: WeightStore) -> dict | None:
    """The unshared weights a search's trials start from: the spec's file, the store's copy, or new
    (from the fixed settings); None when no trial fuses or maps by CKA."""
    if not any(s.needs_pretrained() for s in spec.extreme_settings()):
        return None
    settings = trial_settings({"family": spec.family, **spec.fixed})
    if settings.pretrained:
        return torch.load(settings.pretrained, map_location="cpu")
    cached = store.read(PRETRAINED_FILE)
    if cached is not None:
        return torch.load(io.BytesIO(cached), map_location="cpu")
    state = pretrain(settings, data)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write(PRETRAINED_FILE, buffer.getvalue())
    return state
