"""The Ray Tune function trainable: parse the trial's config once, build, train with the recipe, report.

Every epoch reports a TrialMetrics record (sharetune.metrics) and a checkpoint (model, optimizer and
lr-scheduler state), so a trial interrupted mid-search resumes at the next epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from sharetune.data import TensorData
from sharetune.metrics import TrialMetrics
from sharetune.spaces import trial_settings
from sharetune.trainables.build import build_model, costs_of
from sharetune.training import make_optimizer, make_scheduler, pick_device, train_epochs

CHECKPOINT = "trial.pt"


def train_trial(config: dict, data: TensorData, pretrained: dict | None = None) -> None:
    """Ray Tune entry point; `data` and `pretrained` come once per search through the object store."""
    settings = trial_settings(config)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(settings.seed)
    model = build_model(settings, data, pretrained)
    costs = costs_of(model, data)
    device = pick_device()
    model.to(device)
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
    node = ray.get_runtime_context().get_node_id()
    for epoch in train_epochs(model, data, settings, device=device, optimizer=optimizer, scheduler=scheduler, start_epoch=start_epoch):
        with tempfile.TemporaryDirectory() as folder:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch.epoch}
            torch.save(state, Path(folder) / CHECKPOINT)
            tune.report({**TrialMetrics(costs, epoch).as_dict(), "node_id": node},
                        checkpoint=tune.Checkpoint.from_directory(folder))
