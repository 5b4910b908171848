"""Spec -> Ray Tune run: data into the object store once, OptunaSearch, optional ASHA, MLflow.

Everything that can be wrong with a spec fails in `run` (validation, sampler, data) before Ray
starts. The search folder (storage/name) holds Tune's state plus the spec, so `resume` and `report`
need nothing but the folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import ray
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sharetune.data import TensorData, load
from sharetune.search import storage
from sharetune.search.mlflow_logger import MlflowLogger, tracking_uri
from sharetune.search.progress import Progress
from sharetune.search.samplers import make_sampler
from sharetune.spaces import SearchSpec, parse_spec
from sharetune.spaces.space import OptunaSpace
from sharetune.trainables import train_trial
from sharetune.trainables.build import build_spin, settings_of, unwrap
from sharetune.trainables.trial import recipe_of
from sharetune.training import train_epochs

SPEC_FILE = "sharetune-spec.yaml"
MLFLOW_FILE = "sharetune-mlflow.json"  # where this search's runs live
PRETRAINED_FILE = "pretrained.pt"
DEFAULT_STORAGE = "results"


@dataclass
class Search:
    spec: SearchSpec
    path: str  # the search folder, storage/name: an absolute path or a URI
    mlflow_uri: str


def load_data(spec: SearchSpec) -> TensorData:
    d = spec.data
    data = load(d.name, d.root, label_noise=d.label_noise, seed=d.seed)
    train, test = slice(0, d.train_subset), slice(0, d.test_subset)
    return TensorData(data.name, data.x_train[train], data.y_train[train], data.x_test[test], data.y_test[test], data.num_classes)


def _metadata() -> dict[str, str]:
    try:
        package = version("sharetune")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"sharetune.version": package, "sharetune.git_commit": commit}


def _parent_params(spec: SearchSpec) -> dict:
    params = {"name": spec.name, "family": spec.family, "dataset": spec.data.name, "sampler": spec.sampler,
              "objectives": ",".join(f"{k}:{v}" for k, v in spec.objectives.items()),
              "num_samples": spec.num_samples(), "scheduler": spec.scheduler.name if spec.scheduler else "none"}
    params.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    params.update({f"dimension.{k}": f"{d.kind} {d.choice if d.kind == 'choice' else d.bounds()}" for k, d in spec.dimensions.items()})
    return params


def pretrain(spec: SearchSpec, data: TensorData) -> dict:
    """Train the unshared network once per search: the weights SPIN's fusion strategies start from."""
    config = {"family": spec.family, **spec.fixed}
    settings = settings_of(config)
    model = build_spin(settings, data, unshared=True)
    recipe = dataclasses.replace(recipe_of(config), epochs=settings.pretrain_epochs)
    for result in train_epochs(model, data, recipe):
        print(f"pretraining the unshared {settings.model}: epoch {result.epoch}/{recipe.epochs}, "
              f"test accuracy {result.test_accuracy:.4f}", flush=True)
    return {k: v.cpu() for k, v in unwrap(model).state_dict().items()}


def pretrained_weights(spec: SearchSpec, data: TensorData, folder: str) -> dict | None:
    """The unshared weights fusion starts from: the spec's file, the search's cached copy, or new."""
    if spec.family != "spin" or not _may_fuse(spec):
        return None
    if spec.fixed.get("pretrained"):
        return torch.load(spec.fixed["pretrained"], map_location="cpu")
    cached = storage.read(folder, PRETRAINED_FILE)
    if cached is not None:
        return torch.load(io.BytesIO(cached), map_location="cpu")
    state = pretrain(spec, data)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write(folder, PRETRAINED_FILE, buffer.getvalue())
    return state


def _may_fuse(spec: SearchSpec) -> bool:
    values = [spec.fixed.get("fusion")] + [v.get("fusion") for v in spec.variants.values()]
    if "fusion" in spec.dimensions:
        values += spec.dimensions["fusion"].choice or []
    return any(v is not None for v in values)


def start_ray(address: str | None) -> None:
    """Join `address` (auto, ray://host:10001) or start an embedded local Ray."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _trainable(spec: SearchSpec, data: TensorData, pretrained: dict | None):
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(train_trial, data=data, pretrained=pretrained), resources)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default repeats the whole config in the folder name


def run(spec: SearchSpec, *, storage_path: str = DEFAULT_STORAGE, address: str | None = None,
        mlflow_uri: str | None = None, name: str | None = None, progress: bool = True) -> Search:
    """`storage_path`: a local folder, a shared filesystem, or an object store URI."""
    sampler = make_sampler(spec)  # bad sampler options fail here, before Ray starts
    data = load_data(spec)
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = storage.join(storage_path, name)
    storage.write(folder, SPEC_FILE, spec.to_yaml().encode())
    uri = tracking_uri(mlflow_uri)
    storage.write(folder, MLFLOW_FILE, json.dumps({"tracking_uri": uri, "experiment": spec.name}).encode())
    start_ray(address)
    pretrained = pretrained_weights(spec, data, folder)
    metrics, modes = list(spec.objectives), list(spec.objectives.values())
    single = not spec.multi_objective
    searcher = OptunaSearch(
        OptunaSpace(spec), metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
        sampler=sampler, study_name=spec.name, seed=spec.seed,
        storage=_optuna_storage(spec.optuna_storage),
    )
    scheduler = None
    if spec.scheduler is not None:
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=metrics[0], mode=modes[0],
                                  max_t=spec.max_epochs(), grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    callbacks = [MlflowLogger(uri, spec.name, folder, _parent_params(spec), {**_metadata(), "sharetune.preset": spec.name})]
    if progress:
        callbacks.append(Progress(spec.objectives, spec.num_samples()))
    tuner = tune.Tuner(
        _trainable(spec, data, pretrained),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples(),
                                    max_concurrent_trials=spec.budget.max_concurrent,
                                    time_budget_s=spec.budget.time_limit_s, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),  # a worker per trial costs seconds of imports
        run_config=tune.RunConfig(name=name, storage_path=storage.canonical(storage_path), callbacks=callbacks, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    tuner.fit()
    return Search(spec, folder, uri)


# Checkpointing every epoch (so trials resume exactly) makes Tune snapshot its state often; that is
# the point, so its warning about it is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _optuna_storage(url: str | None):
    if url is None:
        return None
    import optuna

    return optuna.storages.RDBStorage(url)


def _read(folder: str, filename: str) -> bytes:
    data = storage.read(folder, filename)
    if data is None:
        raise FileNotFoundError(f"{folder}: not a sharetune search folder (no {filename})")
    return data


def read_spec(folder: str | Path) -> SearchSpec:
    return parse_spec(yaml.safe_load(_read(str(folder), SPEC_FILE)))


def resume(folder: str | Path, *, address: str | None = None) -> Search:
    """Continue an interrupted search: finished trials stay, unfinished ones restart from their
    last checkpoint, errored ones are retried; the MLflow runs are found again by their tags."""
    folder = storage.canonical(folder)
    spec = read_spec(folder)
    data = load_data(spec)
    start_ray(address)
    pretrained = pretrained_weights(spec, data, folder)
    tuner = tune.Tuner.restore(folder, trainable=_trainable(spec, data, pretrained), resume_errored=True)
    tuner.fit()
    return Search(spec, folder, mlflow_location(folder)["tracking_uri"])


def mlflow_location(folder: str | Path) -> dict:
    """{tracking_uri, experiment} of a search folder."""
    return json.loads(_read(storage.canonical(folder), MLFLOW_FILE))
