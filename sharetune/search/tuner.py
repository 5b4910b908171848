"""Spec -> Ray Tune run: data into the object store once, Optuna behind ConfigurationSearcher,
optional ASHA or MO-ASHA, MLflow.

Everything that can be wrong with a spec fails in `run` (validation, sampler, data) before Ray
starts. The search folder holds Tune's state plus the spec, so `resume` and `report` need nothing
but the folder.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
from ray import tune

from sharetune.data import Batches, DataError, load
from sharetune.errors import first_line
from sharetune.metrics import STEP, ModelCosts, dense_reference
from sharetune.search import cluster
from sharetune.search.asha import KeptASHA
from sharetune.search.destinations import check_destinations, create_store
from sharetune.search.lease import ANOTHER_NAME, RESUME_LATER, Lease, running_driver
from sharetune.search.mlflow_logger import MlflowLogger, deliver_backlog, remove_orphans, tracking_uri
from sharetune.search.mlflow_queue import check_queue
from sharetune.search.moasha import MOASHA
from sharetune.search.progress import Progress, StartSteps, terminal_console
from sharetune.search.result_log import ResultLog
from sharetune.search.retries import NoRetryWhenUnbuildable
from sharetune.search.searcher import ConfigurationSearcher
from sharetune.search.storage import (
    SearchFolder,
    StateError,
    StorageFull,
    check_free_space,
    stop_on_full_disk,
)
from sharetune.spaces import OptunaSpace, SearchSpec, SpecError, make_sampler
from sharetune.spaces.locations import DEFAULT_STORAGE, expand_home
from sharetune.storage_filesystem import filesystem_and_path, keep_final_checkpoints, tune_storage
from sharetune.trainables import (
    DRIVER_MEMORY,
    check_search,
    cluster_pretrainer,
    config_costs,
    pretrained_weights,
    train_trial,
)


@dataclass
class Search:
    spec: SearchSpec
    folder: SearchFolder
    mlflow_uri: str
    mlflow_backlog: int = 0  # writes still queued for MLflow (its server did not answer in time)
    note: str | None = None  # what a resume that trained nothing should say


class Interrupted(Exception):
    """A second Ctrl-C while the search ended (Tune's last save, MLflow's backlog): the trials were
    stopped by the first, and `folder` is what `resume` continues."""

    def __init__(self, folder: SearchFolder) -> None:
        super().__init__(str(folder))
        self.folder = folder


def load_data(spec: SearchSpec) -> Batches:
    """The spec's data; an error naming one of its settings names it as the spec does (`data.val_fraction`)."""
    try:
        return load(**spec.data.model_dump())
    except DataError as err:
        raise err.spelled(lambda setting: f"data.{setting}") from None


def ray_step(address: str | None) -> str:
    """What starting Ray is, as the start's spinner says it."""
    return "starting a local Ray" if address is None else f"joining the Ray cluster at {address}"


def start_ray(spec: SearchSpec, address: str | None) -> None:
    """Join the cluster (or start a local Ray) and refuse a spec one trial of which it cannot hold."""
    cluster.start_ray(address)
    cluster.check_resources(spec.resources, ray.cluster_resources())


def _trainable(spec: SearchSpec, data: Batches, pretrained: dict | None, folder: SearchFolder):
    """A trial takes its resources itself, or with several workers only starts them: Ray Train places
    them, and the trial's driver holds a token of memory (Tune places nothing without a resource)."""
    distributed = spec.resources.workers > 1
    resources = {"cpu": 0, "memory": DRIVER_MEMORY} if distributed else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_parameters(train_trial, data=data, pretrained=pretrained, resources=spec.resources, storage=str(folder))
    return tune.with_resources(trainable, resources)


def _pretrained(spec: SearchSpec, data: Batches, folder: SearchFolder, step: StartSteps) -> dict | None:
    """The unshared weights the trials start from (fusion, cka): the folder's copy, else trained on the
    cluster with a trial's resources and kept there."""
    if spec.pretraining_settings() is not None:
        step("the unshared model the trials start from")
    return pretrained_weights(spec, data, folder, cluster_pretrainer(spec.resources, str(folder)))


def trial_dirname(trial) -> str:
    return SearchFolder.trial_dirname(trial.trial_id)


def run(spec: SearchSpec, *, storage: str | Path | None = None, address: str | None = None,
        mlflow_uri: str | None = None, name: str | None = None, progress: bool = True) -> Search:
    """`storage`: where the search folder goes (a local folder, a shared filesystem, or a URI; default
    DEFAULT_STORAGE)."""
    cluster.check_reachable(address)  # first: an unreachable --address fails in seconds, before the data loads
    spec = spec.with_data_root()
    check_destinations(str(storage or DEFAULT_STORAGE), name, tracking_uri(mlflow_uri))  # cheap: before the data loads
    folder = SearchFolder.at(storage or DEFAULT_STORAGE, name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_new(folder)
    return _start(spec, folder, address, tracking_uri(mlflow_uri), progress, new=True)


def check_new(folder: SearchFolder) -> None:
    """SpecError where `folder` holds a search: a second one there would mix its trials and state into the first's."""
    if folder.is_search():
        holder = running_driver(folder)
        if holder is not None and holder.is_this_process():  # checked again once this driver took the lease
            holder = None
        how = (f"{holder.described()} is running it; give this one another name" if holder is not None else
               f"choose another name, or continue that one with `sharetune resume {folder}`")
        raise SpecError(f"--name: {folder} already holds a search; {how}")


def _start(spec: SearchSpec, folder: SearchFolder, address: str | None, uri: str, progress: bool, *, new: bool) -> Search:
    """A search in `folder`, where Tune has not started one (`new`: none was started there): checked, its spec
    and MLflow store saved, run."""
    with contextlib.ExitStack() as driven:  # the folder's lease, from before it is written to the search's end
        with StartSteps(terminal_console() if progress else None) as step:  # until the bar takes over
            sampler = make_sampler(spec)  # bad sampler options fail here, before the data loads
            step(f"loading {spec.data.name}")
            data = load_data(spec)
            check_same_data(spec, data, folder)  # a resume of a search stopped before its trials started
            step("checking the models at the dimensions' extremes")
            extremes = check_search(spec, data)  # dry runs: the sampler past its warm-up, each extreme's model, the pretrained weights
            # The fronts' fixed reference: the largest dense model's costs, saved with the spec, unless it sets them
            spec = spec.model_copy(update={"hypervolume_reference": {**dense_reference(extremes), **spec.hypervolume_reference}})
            check_free_space(folder.storage)
            optuna_storage = _optuna_storage(spec.optuna_storage)  # a database that does not answer fails before Ray starts
            if optuna_storage is not None and folder.name in optuna.study.get_all_study_names(optuna_storage):
                raise SpecError(f"optuna_storage: its study {folder.name} belongs to another search of that name; "
                                "give this one another --name")
            step(ray_step(address))
            start_ray(spec, address)  # an unreachable or too small cluster fails here, before the folder is written
            create_store(uri)  # a new SQLite store: one its disk cannot hold fails here, not in every write after
            # one driver per folder: of two searches given one --name at once, the second stops here
            driven.enter_context(Lease(folder, ANOTHER_NAME if new else RESUME_LATER)).confirm()
            if new:
                check_new(folder)  # or one started and ended there while this one loaded its data
            folder.save_spec(spec)
            folder.save_mlflow(uri, spec.name)
            folder.save_data_listing(data.listing)
            pretrained = _pretrained(spec, data, folder, step)
            step("starting the trials")
            # One study per search, named as its folder: a spec run again starts afresh (`resume` restores the study)
            study = optuna.create_study(storage=optuna_storage, sampler=sampler, study_name=folder.name,
                                        directions=spec.directions)
            with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
                study.set_metric_names(list(spec.objectives))  # optuna-dashboard shows them
            searcher = ConfigurationSearcher(OptunaSpace(spec), spec.objectives, study, folder, num_samples=spec.num_samples(),
                                             repeats=spec.repeats, constraints=spec.constraints,
                                             costs=ProposalCosts(spec, folder, data, pretrained),
                                             space_size=spec.distinct_configurations())
            callbacks = [MlflowLogger.for_search(spec, folder, uri), NoRetryWhenUnbuildable(), ResultLog()]
            if progress:
                callbacks.append(Progress(spec.objectives, spec.expected_trials(), spec.max_epochs()))
            tuner = tune.Tuner(
                _trainable(spec, data, pretrained, folder),
                # The searcher ends the search: proposals answered without training do not count
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(spec, folder), num_samples=-1,
                                            max_concurrent_trials=spec.budget.max_concurrent,
                                            time_budget_s=spec.budget.time_limit_s, trial_dirname_creator=trial_dirname,
                                            reuse_actors=True),  # a worker per trial costs seconds of imports
                run_config=tune.RunConfig(name=folder.name, **tune_storage(folder.storage), callbacks=callbacks, verbose=0,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          # a trial whose worker or node dies goes on from its last checkpoint
                                          failure_config=tune.FailureConfig(max_failures=spec.budget.max_failures)),
            )
        return Search(spec, folder, uri, fit(tuner, folder))


def fit(tuner: tune.Tuner, folder: SearchFolder) -> int:
    """Run the search, then deliver what MLflow has not yet received; returns the writes left queued.
    A full disk stops the search after that delivery too: the writes the disk had no room for are
    only in this process's memory. Once the search has ended with its final state saved, each trial
    keeps only the checkpoint that state names."""
    try:
        try:
            with stop_on_full_disk(folder):
                results = tuner.fit()
            keep_final_checkpoints(folder, [result.checkpoint.path for result in results if result.checkpoint])
        except StorageFull:
            deliver_backlog(folder)
            raise
        return deliver_backlog(folder)
    except KeyboardInterrupt:  # Tune takes the first Ctrl-C itself, and gives the next back to Python
        raise Interrupted(folder) from None


class ProposalCosts:
    """A configuration's costs before training, for the searcher's constraints. Tune pickles the
    searcher, so this holds the spec and the folder, and the data only in memory (loaded again after
    a restore)."""

    def __init__(self, spec: SearchSpec, folder: SearchFolder, data: Batches | None = None,
                 pretrained: dict | None = None) -> None:
        self.spec, self.folder, self.loaded = spec, folder, (data, pretrained) if data is not None else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "loaded": None}

    def __call__(self, config: dict) -> ModelCosts:
        if self.loaded is None:
            data = load_data(self.spec)
            self.loaded = data, pretrained_weights(self.spec, data, self.folder)
        return config_costs(config, *self.loaded)


def _scheduler(spec: SearchSpec, folder: SearchFolder):
    """The spec's early stopping: ASHA on the one objective, or MO-ASHA on all of them (either's rungs
    kept in the folder, for `resume`)."""
    if spec.scheduler is None:
        return None
    options = {"max_t": spec.scheduler_max_t(), "grace_period": spec.scheduler.grace_period,
               "reduction_factor": spec.scheduler.reduction_factor}
    if spec.scheduler.name == "moasha":
        return MOASHA(spec.objectives, reference=spec.hypervolume_reference, store=folder, **options)
    (metric, mode), = spec.objectives.items()
    return KeptASHA(time_attr=STEP, metric=metric, mode=mode, store=folder, **options)  # epoch 0 (the costs) has no metric


# sharetune reads each trial's result.json alone (ResultLog) and compares results in MLflow: Tune's CSV
# and TensorBoard logs cost disk every epoch, and a second Ctrl-C printed tensorboardX's traceback
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Checkpointing every epoch (so trials resume exactly) makes Tune snapshot its state often; that is
# the point, so its warning about it is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Each result is processed before the trial's next step runs: so an unbuildable trial's report
# reaches sharetune.search.retries before its error does. Tune's result buffering would batch them.
os.environ["TUNE_RESULT_BUFFER_LENGTH"] = "1"
# Tune checks that every result carries the objectives; the costs' report before training cannot
# carry the accuracy, and the metrics' names come from one typed record (sharetune.metrics).
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def _optuna_storage(url: str | None) -> optuna.storages.RDBStorage | None:
    """The spec's Optuna database, connected (RDBStorage creates its tables); SpecError where it does not answer."""
    from sqlalchemy.exc import SQLAlchemyError

    if url is None:
        return None
    try:
        return optuna.storages.RDBStorage(expand_home(url))
    except SQLAlchemyError as err:
        raise SpecError(f"optuna_storage: the database did not answer ({first_line(getattr(err, 'orig', None) or err)})") from None


def resume(folder: SearchFolder, *, address: str | None = None) -> Search:
    """Continue an interrupted search: finished trials stay, unfinished ones restart from their
    last checkpoint, errored ones are retried; the MLflow runs are found again by their tags. One
    stopped before Tune started its trials (while pretraining, say) starts them."""
    spec = folder.spec()
    cluster.check_reachable(address)
    with Lease(folder) as lease:  # a resume of a search that still runs stops here, before it changes anything
        return _restore(spec, folder, address, lease)


def _restore(spec: SearchSpec, folder: SearchFolder, address: str | None, lease: Lease) -> Search:
    if not folder.tune_started():
        try:
            uri = folder.mlflow()[0]
        except FileNotFoundError:  # stopped before it recorded its store
            uri = tracking_uri(None)
        return _start(spec, folder, address, uri, progress=True, new=False)
    recorded = folder.tune_trial_ids()  # a folder with no readable Tune state fails here, untouched
    folder.check_in_place()
    check_queue(folder)
    if (scheduler := _scheduler(spec, folder)) is not None:
        scheduler.check_kept()
    uri = folder.mlflow()[0]
    create_store(uri)  # where a broken store was moved away, say
    with StartSteps(terminal_console()) as step:
        step(f"loading {spec.data.name}")
        data = load_data(spec)
        check_same_data(spec, data, folder)
        step(ray_step(address))
        start_ray(spec, address)
        lease.confirm()
        pretrained = _pretrained(spec, data, folder, step)
        step("restoring the search's state")
        try:
            filesystem, path = filesystem_and_path(folder)
            tuner = tune.Tuner.restore(path, storage_filesystem=filesystem, trainable=_trainable(spec, data, pretrained, folder),
                                       resume_errored=True)
        except Exception as err:  # Tune's own record (tuner.pkl) unreadable: never fall back to a new search
            raise StateError(f"{folder}: Tune's state cannot be restored ({type(err).__name__}: "
                             f"{first_line(err) or 'unreadable'}); the folder is left as it is") from None
        folder.forget_pending_decisions()  # Tune reads its state when the search starts again (fit), not before
        remove_orphans(folder, recorded)  # runs of trials a killed driver started after Tune's last snapshot
    limited = spec.budget.time_limit_s is not None
    trained = epochs_trained(folder) if limited else None
    search = Search(spec, folder, uri, fit(tuner, folder))  # with what an earlier driver left queued
    if limited and epochs_trained(folder) == trained:  # Tune keeps what is left of the limit
        search.note = (f"budget.time_limit_s: the search had spent its {spec.budget.time_limit_s:g} s, so nothing more "
                       "trained; a new search trains more")
    return search


def check_same_data(spec: SearchSpec, data: Batches, folder: SearchFolder) -> None:
    """A resumed search's trials go on with the files its first trials trained on (an image folder may have
    changed since: its train/val split would shift, and trials would compare on different images)."""
    started = folder.data_listing()
    if started is not None and data.listing != started:
        raise DataError(f"{spec.data.root}: its files now ({data.listing}) are not those the search started with "
                        f"({started}); put those back to resume it, or start a new search", "data.root")


def epochs_trained(folder: SearchFolder) -> int:
    """Every epoch the folder's trials have reported, over all of them."""
    return sum((trial.last_result or {}).get(STEP, 0) for trial in folder.tune_trials())
