"""The Ray Tune function trainable: build the trial's model, train it with the paper recipe, report.

Every epoch reports the metrics in sharetune.spaces.METRICS and a checkpoint (model, optimizer and
lr-scheduler state), so a trial interrupted mid-search resumes at the next epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import torch
from ray import tune
from torch import nn

from sharetune.data import TensorData
from sharetune.metrics import count_macs, count_params
from sharetune.models.fusion import FusedLayer, fold
from sharetune.trainables.build import build_model, settings_of, unwrap
from sharetune.training import Recipe, make_optimizer, make_scheduler, pick_device, train_epochs

CHECKPOINT = "trial.pt"


def deployed(model: nn.Module) -> nn.Module:
    """The model as it ships: fused layers folded to one weight each (SPIN Table 3 counts these)."""
    inner = unwrap(model)
    if not any(isinstance(m, FusedLayer) for m in inner.modules()):
        return model
    return nn.Sequential(model[0], fold(inner)) if inner is not model else fold(model)


def static_metrics(model: nn.Module, data: TensorData) -> dict[str, float]:
    """What does not change while training: sizes, cost, and how the weights are shared."""
    model = deployed(model)
    params = count_params(model)
    metrics = {
        "unique_params": params.unique,
        "virtual_params": params.virtual,
        "macs": count_macs(model, data.input_shape),
        "share_rate": params.virtual / params.unique,
    }
    entropy = getattr(model, "entropy", None)
    if entropy is not None:  # ArbNet: table-usage entropy (eq. 7)
        metrics["entropy"] = entropy()
    return metrics


def recipe_of(config: dict) -> Recipe:
    s = settings_of(config)
    return Recipe(epochs=s.epochs, lr=s.lr, momentum=s.momentum, batch_size=s.batch_size,
                  weight_decay=s.weight_decay, plateau_epochs=s.plateau_epochs, seed=s.seed)


def train_trial(config: dict, data: TensorData, pretrained: dict | None = None) -> None:
    """Ray Tune entry point; `data` and `pretrained` come once per search through the object store."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(settings_of(config).seed)
    model = build_model(config, data, pretrained)
    static = static_metrics(model, data)
    device = pick_device()
    recipe = recipe_of(config)
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
    for result in train_epochs(model, data, recipe, device=device, optimizer=optimizer, scheduler=scheduler, start_epoch=start_epoch):
        metrics = {**static, **result.as_dict(), "diverged": int(result.diverged),
                   "node_id": ray.get_runtime_context().get_node_id()}
        with tempfile.TemporaryDirectory() as folder:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": result.epoch}
            torch.save(state, Path(folder) / CHECKPOINT)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
