"""The unshared model SPIN's fusion and cka mapping start from: trained once per search, or loaded.

The weights are cached in the search's folder (any `FileStore`: read/write bytes by file name), so
a resumed search does not pretrain again. `pretrain` trains in this process (`sharetune train`); a
search passes `pretrained_weights` the cluster's pretraining (sharetune.trainables.cluster_pretraining),
which runs the same function as Ray work with the trials' resources.
"""

from __future__ import annotations

import io
from typing import Callable

import torch
from torch import nn

from sharetune.data import Batches
from sharetune.models import load_state_dict
from sharetune.spaces import SearchSpec, SpinSettings
from sharetune.storage_filesystem import FileStore
from sharetune.trainables.build import build_spin, unwrap
from sharetune.training import TrainingState, pick_device, train_epochs

PRETRAINED_FILE = "pretrained.pt"


def show(line: str) -> None:
    """A progress line on stdout at once (a submitted job's log is a pipe, buffered otherwise)."""
    print(line, flush=True)


def pretrain(settings: SpinSettings, data: Batches, *, device: torch.device | None = None, cpus: int | None = None,
             wrap: Callable[[nn.Module], nn.Module] | None = None, say: Callable[[str], None] = show) -> dict:
    """Train the unshared network for `pretrain_epochs` with the trial's recipe and precision; the
    state_dict it was evaluated with (the EMA's, where the recipe keeps one), on CPU. `cpus`: threads
    and loader workers (as a trial's); `wrap`: DDP on a Ray Train worker; `say` gets one progress line
    per epoch."""
    data = data.with_resolution(settings.resolution)
    if cpus is not None:
        torch.set_num_threads(cpus)
    torch.manual_seed(settings.seed)
    model = build_spin(settings, data, unshared=True).to(pick_device(device))
    recipe = settings.model_copy(update={"epochs": settings.pretrain_epochs})  # the settings refuse a warm-up past it
    state = TrainingState.for_data(model, recipe, data)
    for epoch in train_epochs(model, data, recipe, device=device, state=state, workers=cpus or 0, wrap=wrap):
        say(f"pretraining the unshared {settings.model}: epoch {epoch.epoch}/{recipe.epochs}, loss {epoch.loss:.4f}, "
            f"test accuracy {epoch.test_accuracy:.4f}")
    return {k: v.cpu() for k, v in unwrap(state.evaluated(model)).state_dict().items()}  # the EMA's, where it keeps one


Pretrainer = Callable[[SpinSettings, Batches], dict]


def pretrained_weights(spec: SearchSpec, data: Batches, store: FileStore, train: Pretrainer = pretrain) -> dict | None:
    """The unshared weights a search's trials start from: the spec's file, the store's copy, or new
    (from the fixed settings, by `train`); None when no trial fuses or maps by CKA."""
    settings = spec.pretraining_settings()
    if settings is None:
        return None
    if settings.pretrained:
        return load_state_dict(settings.pretrained)
    cached = store.read(PRETRAINED_FILE)
    if cached is not None:
        return load_state_dict(cached)
    state = train(settings, data)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write(PRETRAINED_FILE, buffer.getvalue())
    return state
