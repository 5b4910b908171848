"""Spec -> Ray Tune run: data into the object store once, OptunaSearch, optional ASHA, MLflow.

Everything that can be wrong with a spec fails in `run` (validation, sampler, data) before Ray
starts. The search folder holds Tune's state plus the spec, so `resume` and `report` need nothing
but the folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sharetune.data import Batches, load
from sharetune.metrics import STEP
from sharetune.search import cluster
from sharetune.search.destinations import check_destinations
from sharetune.search.mlflow_logger import MlflowLogger, remove_orphans, tracking_uri
from sharetune.search.moasha import MOASHA
from sharetune.search.progress import Progress
from sharetune.search.storage import DEFAULT_STORAGE, SearchFolder, StateError, check_free_space
from sharetune.spaces import OptunaSpace, SearchSpec, make_sampler
from sharetune.trainables import check_search, cluster_pretrainer, pretrained_weights, train_trial


@dataclass
class Search:
    spec: SearchSpec
    folder: SearchFolder
    mlflow_uri: str


def load_data(spec: SearchSpec) -> Batches:
    return load(**spec.data.model_dump())


def start_ray(spec: SearchSpec, address: str | None) -> None:
    """Join the cluster (or start a local Ray) and refuse a spec one trial of which it cannot hold."""
    cluster.start_ray(address)
    cluster.check_resources(spec.resources, ray.cluster_resources())


def _trainable(spec: SearchSpec, data: Batches, pretrained: dict | None, folder: SearchFolder):
    """A trial takes its resources itself, or with several workers only starts them: Ray Train places
    them, and the trial's driver holds a token of memory (Tune places nothing without a resource)."""
    distributed = spec.resources.workers > 1
    resources = {"cpu": 0, "memory": 1 << 20} if distributed else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_parameters(train_trial, data=data, pretrained=pretrained, resources=spec.resources, storage=str(folder))
    return tune.with_resources(trainable, resources)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default repeats the whole config in the folder name


def run(spec: SearchSpec, *, storage: str | Path | None = None, address: str | None = None,
        mlflow_uri: str | None = None, name: str | None = None, progress: bool = True) -> Search:
    """`storage`: where the search folder goes (a local folder, a shared filesystem, or a URI; default
    DEFAULT_STORAGE)."""
    cluster.check_reachable(address)  # first: an unreachable --address fails in seconds, before the data loads
    sampler = make_sampler(spec)  # bad sampler options fail here, before Ray starts
    data = load_data(spec)
    check_destinations(str(storage or DEFAULT_STORAGE), name, tracking_uri(mlflow_uri))
    check_search(spec, data)  # dry runs: the sampler past its warm-up, each extreme's model, the pretrained weights
    folder = SearchFolder.at(storage or DEFAULT_STORAGE, name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_free_space(folder.storage)
    start_ray(spec, address)  # an unreachable or too small cluster fails here, before the folder is written
    folder.save_spec(spec)
    uri = tracking_uri(mlflow_uri)
    folder.save_mlflow(uri, spec.name)
    pretrained = pretrained_weights(spec, data, folder, cluster_pretrainer(spec.resources, str(folder)))
    metrics, modes = list(spec.objectives), list(spec.objectives.values())
    single = not spec.multi_objective
    searcher = EpochOptunaSearch(
        OptunaSpace(spec), metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
        sampler=sampler, study_name=spec.name, seed=spec.seed,
        storage=_optuna_storage(spec.optuna_storage),
    )
    callbacks = [MlflowLogger.for_search(spec, folder, uri)]
    if progress:
        callbacks.append(Progress(spec.objectives, spec.num_samples()))
    tuner = tune.Tuner(
        _trainable(spec, data, pretrained, folder),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(spec), num_samples=spec.num_samples(),
                                    max_concurrent_trials=spec.budget.max_concurrent,
                                    time_budget_s=spec.budget.time_limit_s, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),  # a worker per trial costs seconds of imports
        run_config=tune.RunConfig(name=folder.name, storage_path=folder.storage, callbacks=callbacks, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  # a trial whose worker or node dies goes on from its last checkpoint
                                  failure_config=tune.FailureConfig(max_failures=spec.budget.max_failures)),
    )
    tuner.fit()
    return Search(spec, folder, uri)


class EpochOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, told each epoch's result at its epoch: a trial's first report, its costs
    before training (epoch 0), carries no accuracy for Optuna's pruners to see."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get(STEP, 0) > 0:
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: result[STEP]})


def _scheduler(spec: SearchSpec):
    """The spec's early stopping: ASHA on the one objective, or MO-ASHA on all of them."""
    if spec.scheduler is None:
        return None
    options = {"max_t": spec.scheduler.max_t or spec.max_epochs(), "grace_period": spec.scheduler.grace_period,
               "reduction_factor": spec.scheduler.reduction_factor}
    if spec.scheduler.name == "moasha":
        return MOASHA(spec.objectives, **options)
    (metric, mode), = spec.objectives.items()
    return ASHAScheduler(time_attr=STEP, metric=metric, mode=mode, **options)  # epoch 0 (the costs) has no metric


# Checkpointing every epoch (so trials resume exactly) makes Tune snapshot its state often; that is
# the point, so its warning about it is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune checks that every result carries the objectives; the costs' report before training cannot
# carry the accuracy, and the metrics' names come from one typed record (sharetune.metrics).
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def _optuna_storage(url: str | None):
    if url is None:
        return None
    import optuna

    return optuna.storages.RDBStorage(url)


def resume(folder: SearchFolder, *, address: str | None = None) -> Search:
    """Continue an interrupted search: finished trials stay, unfinished ones restart from their
    last checkpoint, errored ones are retried; the MLflow runs are found again by their tags."""
    spec = folder.spec()
    recorded = folder.tune_trial_ids()  # a folder with no readable Tune state fails here, untouched
    cluster.check_reachable(address)
    data = load_data(spec)
    start_ray(spec, address)
    pretrained = pretrained_weights(spec, data, folder, cluster_pretrainer(spec.resources, str(folder)))
    try:
        tuner = tune.Tuner.restore(str(folder), trainable=_trainable(spec, data, pretrained, folder), resume_errored=True)
    except Exception as err:  # Tune's own record (tuner.pkl) unreadable: never fall back to a new search
        raise StateError(f"{folder}: Tune's state cannot be restored ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); the folder is left as it is") from None
    remove_orphans(folder, recorded)  # runs of trials a killed driver started after Tune's last snapshot
    tuner.fit()
    return Search(spec, folder, folder.mlflow()[0])
