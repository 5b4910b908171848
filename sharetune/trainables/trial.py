"""The Ray Tune function trainable: parse the trial's config once, build, train with the recipe, report.

A trial reports its costs (parameters, MACs) once before training, as epoch 0; then every epoch reports a TrialMetrics record (sharetune.metrics) and a checkpoint (the model and the
recipe's TrainingState: optimizer, schedule, EMA, and every record reported so far), so an interrupted trial resumes at its next epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import ray
import torch
from ray import tune
from torch import nn

from sharetune.data import Batches
from sharetune.metrics import TrialMetrics
from sharetune.spaces import trial_settings
from sharetune.spaces.spec import Resources
from sharetune.trainables.build import build_model, costs_of
from sharetune.training import TrainingState, pick_device, train_epochs

CHECKPOINT = "trial.pt"


def train_trial(config: dict, data: Batches, pretrained: dict | None = None, resources: Resources | None = None,
                storage: str | None = None) -> None:
    """Ray Tune entry point; `data` (tensors, or a folder's description) and `pretrained` come once per
    search through the object store. A folder streams through as many loader workers as the trial has CPUs.
    With `resources.workers` > 1 the trial runs as a Ray Train data-parallel job (sharetune.trainables.
    distributed), its runs kept under `storage` (the search folder)."""
    if resources is not None and resources.workers > 1:
        from sharetune.trainables.distributed import train_distributed

        return train_distributed(config, data, pretrained, resources, storage)
    cpus = max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    run_trial(config, data, pretrained, session=tune, cpus=cpus, device=pick_device())


def run_trial(config: dict, data: Batches, pretrained: dict | None, *, session: ModuleType, cpus: int,
              device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
              extra: Callable[[TrainingState], dict] = lambda state: {}, replay: bool = False) -> None:
    """A trial's training, as one process or as one rank of several: `session` is the module that reports
    and checkpoints (ray.tune, or ray.train in a Ray Train worker); `wrap` what the training forward runs
    through (DDP); `extra` adds values to each epoch's report. Only rank 0 writes the checkpoint.
    `replay`: a resumed trial first reports again the records its checkpoint holds, for a session that
    restarts the trial's record (Tune does for a trial whose checkpoints live in its Ray Train run)."""
    settings = trial_settings(config)
    data = data.with_resolution(settings.resolution)  # a folder decodes at the trial's resolution
    torch.set_num_threads(cpus)
    torch.manual_seed(settings.seed)
    model = build_model(settings, data, pretrained)
    costs = costs_of(model, data)
    model.to(device)
    training = TrainingState(model, settings, data.steps_per_epoch(settings.batch_size), data.num_classes)
    start_epoch, history = 0, []
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT, map_location=device, weights_only=True)  # tensors, never code
        model.load_state_dict(state["model"])
        training.load_state_dict(state["training"])
        start_epoch, history = state["epoch"], state["history"]
        if replay:
            for record in history:
                session.report(record)
    node = ray.get_runtime_context().get_node_id()
    if checkpoint is None:  # the costs are known now: report them before the first batch (as epoch 0)
        history.append({**costs.as_dict(), "node_id": node})
        session.report(history[-1])
    for epoch in train_epochs(model, data, settings, device=device, state=training, start_epoch=start_epoch,
                              workers=cpus, wrap=wrap):
        metrics = {**TrialMetrics(costs, epoch).as_dict(), "node_id": node, **extra(training)}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                state = {"model": model.state_dict(), "training": training.state_dict(), "epoch": epoch.epoch,
                         "history": history}
                torch.save(state, Path(folder) / CHECKPOINT)
            session.report(metrics, checkpoint=session.Checkpoint.from_directory(folder) if rank == 0 else None)
