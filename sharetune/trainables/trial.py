"""The Ray Tune function trainable: parse the trial's config once, build, train with the recipe, report.

A trial reports its costs (parameters, MACs) once before training, as epoch 0; then every epoch reports a TrialMetrics record (sharetune.metrics) and a checkpoint (the model and the
recipe's TrainingState: optimizer, schedule, EMA, and every record reported so far, and what the model was built for), so an interrupted trial resumes at its next epoch and exports without its data.
A trial whose configuration cannot be built instead reports that once (CONFIGURATION_ERROR, no epoch)
and raises: the driver then gives it no retry, since every try would fail alike.
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

from sharetune.data import Batches, DataError
from sharetune.errors import cause_of, first_line
from sharetune.metrics import ModelCosts, TrialMetrics
from sharetune.spaces import FamilySettings, trial_settings
from sharetune.spaces.spec import Resources
from sharetune.trainables.build import build_model, built_for, costs_of
from sharetune.training import TrainingState, pick_device, train_epochs

CHECKPOINT = "trial.pt"
BUILT_FOR = "built_for"  # the checkpoint's record of the model's input and sharing plan (build.built_for)
CONFIGURATION_ERROR = "configuration_error"  # the one report of a trial whose configuration cannot be built
ALLOCATION_FAILED = ("can't allocate memory", "out of memory")  # torch's RuntimeErrors for host and GPU memory


def evaluated_weights(state: dict) -> dict:
    """The weights a checkpoint's metrics were measured with: its model EMA's where the recipe keeps
    one (`TrainingState.evaluated`), else the model's. They are what a trial exports."""
    ema = state["training"]["ema"]  # timm's ModelEmaV3 holds its copy of the model as `module`
    return state["model"] if ema is None else {name.removeprefix("module."): value for name, value in ema.items()}


class ConfigurationError(Exception):
    """The trial's configuration cannot be built into a model that takes its data: every try fails alike."""


def train_trial(config: dict, data: Batches, pretrained: dict | None, resources: Resources, storage: str) -> None:
    """Ray Tune entry point; `data` (tensors, or a folder's description) and `pretrained` come once per
    search through the object store. A folder streams through as many loader workers as the trial has CPUs.
    With `resources.workers` > 1 the trial runs as a Ray Train data-parallel job (sharetune.trainables.
    distributed), its runs kept under `storage` (the search folder)."""
    try:
        if resources.workers > 1:
            from sharetune.trainables.distributed import train_distributed

            return train_distributed(config, data, pretrained, resources, storage)
        run_trial(config, data, pretrained, session=tune, cpus=resources.threads, device=pick_device())
    except Exception as err:
        unbuildable = cause_of(err, ConfigurationError)
        if unbuildable is not None:  # Tune takes this report before the error: the trial then gets no retry
            tune.report({CONFIGURATION_ERROR: str(unbuildable)})
        raise


def built(config: dict, data: Batches, pretrained: dict | None) -> tuple[FamilySettings, Batches, nn.Module, ModelCosts]:
    """The trial's settings, its data at the trial's resolution, its model (seeded) and the model's costs.
    ConfigurationError where the configuration does not build, or its model fails on an input of the
    data's shape (counting the costs runs one); memory running out, a file that cannot be read or the
    node's data (a DataError: its copy of an image folder differs) is no such error (a retry, maybe
    elsewhere, can help)."""
    try:
        settings = trial_settings(config)
        data = data.with_resolution(settings.resolution)
        model = build_model(settings, data, pretrained)
        return settings, data, model, costs_of(model, data)
    except Exception as err:
        if isinstance(err, (MemoryError, OSError, DataError)) or any(words in str(err) for words in ALLOCATION_FAILED):
            raise
        raise ConfigurationError(f"the configuration cannot be built: {type(err).__name__}: {first_line(err) or 'no message'}") from err


def check_same_input(recorded: dict, now: dict) -> None:
    """A resumed trial's data must build the model its checkpoint holds (`built_for`): ConfigurationError,
    so no retry, naming what changed (a class folder added, another resolution, another cka plan). What an
    older checkpoint did not record (its preprocessing) is not compared."""
    changed = next((key for key in now if recorded.get(key, now[key]) != now[key]), None)
    if changed is not None:
        shown = [value if not isinstance(value, list) or len(value) <= 8 else f"{len(value)} of them"
                 for value in (recorded.get(changed), now[changed])]
        raise ConfigurationError(f"the data changed since this trial's checkpoint ({changed}: {shown[0]}, now "
                                 f"{shown[1]}); give the search the data it started with")


def run_trial(config: dict, data: Batches, pretrained: dict | None, *, session: ModuleType, cpus: int,
              device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
              extra: Callable[[TrainingState], dict] = lambda state: {}, replay: bool = False) -> None:
    """A trial's training, as one process or as one rank of several: `session` is the module that reports
    and checkpoints (ray.tune, or ray.train in a Ray Train worker); `wrap` what the training forward runs
    through (DDP); `extra` adds values to each epoch's report. Only rank 0 writes the checkpoint.
    `replay`: a resumed trial first reports again the records its checkpoint holds, for a session that
    restarts the trial's record (Tune does for a trial whose checkpoints live in its Ray Train run)."""
    torch.set_num_threads(cpus)
    settings, data, model, costs = built(config, data, pretrained)  # a folder decodes at the trial's resolution
    model.to(device)
    try:
        training = TrainingState.for_data(model, settings, data)
    except ValueError as err:  # a precision this device lacks: every retry here would fail alike
        raise ConfigurationError(str(err)) from err
    start_epoch, history, model_input = 0, [], built_for(model, data)
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT, map_location=device, weights_only=True)  # tensors, never code
        check_same_input(state.get(BUILT_FOR, model_input), model_input)
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
                         "history": history, BUILT_FOR: model_input}
                torch.save(state, Path(folder) / CHECKPOINT)
            session.report(metrics, checkpoint=session.Checkpoint.from_directory(folder) if rank == 0 else None)
