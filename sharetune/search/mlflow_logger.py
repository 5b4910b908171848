"""Tune -> MLflow: one parent run per search, one nested child run per trial, batched writes.

Ray's MLflowLoggerCallback makes flat runs and one request per metric; this callback runs on the
driver and writes through MlflowClient.log_batch, so it works the same against a local SQLite store
and a remote tracking server. Runs are found again by tags, so a resumed search adds no duplicates.
Child runs get every config value as a param and every metric of sharetune.metrics.METRICS (at
the epoch as step; the costs also at step 0, before training). Proposals the searcher
answered without training (the search folder's skipped list) get a finished child run each, tagged
`sharetune.kind` infeasible (with their costs at step 0) or duplicate (`sharetune.duplicate_of`: the
first one's trials). MLflow keeps params and metrics apart, so the `lr` setting (the initial rate) and the `lr` metric (each epoch's) both show.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)
from ray import tune

from sharetune.data import DEFAULT_ROOT, GENERATED
from sharetune.metrics import METRICS, STEP
from sharetune.search.outcome import FAILED, FINISHED, trial_error
from sharetune.search.searcher import CONFIGURATION
from sharetune.search.storage import SearchFolder
from sharetune.spaces import SearchSpec, trial_settings

SEARCH_TAG = "sharetune.search_path"  # the search folder, as SearchFolder spells it
TRIAL_TAG = "sharetune.trial_id"
KIND_TAG = "sharetune.kind"  # infeasible | duplicate: a proposal answered without training
CONFIGURATION_TAG = "sharetune.configuration"  # its Optuna trial number
DUPLICATE_TAG = "sharetune.duplicate_of"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(uri: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def local_artifacts() -> str:
    """Artifact root beside the embedded store: ./mlartifacts."""
    return Path(DEFAULT_ARTIFACTS).resolve().as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if need be, tagged as model training: without the tag MLflow 3's
    UI guesses a GenAI experiment and opens on traces instead of the runs."""
    found = client.get_experiment_by_name(name)
    if found is None:
        local = client.tracking_uri.startswith("sqlite:")  # a server chooses its own artifact store
        experiment = client.create_experiment(name, artifact_location=local_artifacts() if local else None)
    else:
        experiment = found.experiment_id
    if found is None or found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment


def find_parent(client: MlflowClient, experiment: str, folder: SearchFolder):
    runs = client.search_runs([experiment], f"tags.`{SEARCH_TAG}` = '{folder}'", max_results=1)
    return runs[0] if runs else None


def parent_run_of(folder: SearchFolder) -> tuple[str, str | None]:
    """The folder's tracking URI and its search's parent run id (None if MLflow has no such run)."""
    uri, experiment = folder.mlflow()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parent = found and find_parent(client, found.experiment_id, folder)
    return uri, parent.info.run_id if parent else None


def trial_runs(uri: str, parent_id: str) -> dict[str, str]:
    """A search's child runs of trained trials: trial id -> run id."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in children if TRIAL_TAG in run.data.tags}


def remove_orphans(folder: SearchFolder, recorded: list[str]) -> list[str]:
    """Delete the child runs of trials Tune's restored state never recorded (a driver killed between
    starting a trial and Tune's next snapshot); resumed, the search starts those trials afresh under
    new ids, so keeping the runs would count them twice. Returns the deleted trial ids."""
    uri, parent = parent_run_of(folder)
    if parent is None:
        return []
    client = MlflowClient(uri)
    orphans = {trial: run for trial, run in trial_runs(uri, parent).items() if trial not in set(recorded)}
    for run in orphans.values():
        client.delete_run(run)
    return list(orphans)


def source_tags() -> dict[str, str]:
    """The package version and git commit the search ran, and who ran it, as sharetune's tags and
    MLflow's standard ones (which the UI shows in its source and user columns)."""
    try:
        package = version("sharetune")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"sharetune.version": package, "sharetune.git_commit": commit, MLFLOW_GIT_COMMIT: commit,
            MLFLOW_USER: getpass.getuser(), MLFLOW_SOURCE_NAME: "sharetune", MLFLOW_SOURCE_TYPE: "LOCAL"}


def dataset_of(spec: SearchSpec) -> Dataset:
    """The search's data as an MLflow dataset: its name, a digest of what selects the examples (name,
    root, subsets, seeds, val split), and where it comes from."""
    settings = spec.data.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    source = str(Path(spec.data.root or DEFAULT_ROOT).resolve()) if spec.data.name not in GENERATED else "generated"
    return Dataset(name=spec.data.name, digest=digest, source_type="local", source=source,
                   profile=json.dumps(settings))


def initials(setting: str) -> str:
    """`table_size` -> `ts`: short enough for a run name."""
    return "".join(word[0] for word in setting.split("_"))


def run_name(config: dict, searched: list[str], trial_id: str) -> str:
    """`dirichlet a=0.1 s=0.5 #3f2a`: the searched values (text bare, numbers after their setting's
    initials) and the end of the trial id."""
    parts = []
    for name in searched:
        value = config.get(name)
        if isinstance(value, str):
            parts.append(value)
        elif value is not None:
            parts.append(f"{initials(name)}={value:.3g}" if isinstance(value, float) else f"{initials(name)}={value}")
    return " ".join([*parts, f"#{trial_id[-4:]}"])


def effective_params(config: dict) -> dict:
    """Every setting a trial trains with, the defaults it did not set included, beside its config."""
    return {**trial_settings(config).model_dump(mode="json"), **config}


def parent_params(spec: SearchSpec) -> dict:
    """What the search's parent run shows of its spec."""
    params = {"name": spec.name, "family": spec.family, "dataset": spec.data.name, "sampler": spec.sampler,
              "objectives": ",".join(f"{k}:{v}" for k, v in spec.objectives.items()),
              "num_samples": spec.num_samples(), "scheduler": spec.scheduler.name if spec.scheduler else "none"}
    params.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    params.update({f"hypervolume_reference.{k}": v for k, v in spec.hypervolume_reference.items()})
    params.update({f"dimension.{k}": f"{d.kind} {d.choice if d.kind == 'choice' else d.bounds()}" for k, d in spec.dimensions.items()})
    return params


def _batched(items: list, size: int = 100):  # MLflow caps params per log_batch at 100
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowLogger(tune.Callback):
    def __init__(self, uri: str, experiment: str, folder: SearchFolder, params: dict, tags: dict, *,
                 searched: list[str] = (), dataset: Dataset | None = None, spec_yaml: str = "",
                 description: str = "") -> None:
        """`searched`: the settings that name a child run; `dataset`: what each child trains on;
        `spec_yaml` and `description`: the parent run's spec artifact and note."""
        self.uri, self.experiment, self.folder = uri, experiment, folder
        self.params, self.tags = params, tags
        self.searched, self.dataset, self.spec_yaml, self.description = list(searched), dataset, spec_yaml, description
        self.client: MlflowClient | None = None
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}
        self.logged_steps: dict[str, int] = {}  # resumed trials: the last epoch already in MLflow (0: the costs)
        self.skipped_logged: set[int] = set()  # configuration numbers with a run
        self.running: set[str] = set()  # trials started and neither completed nor failed since

    @classmethod
    def for_search(cls, spec: SearchSpec, folder: SearchFolder, uri: str) -> "MlflowLogger":
        searched = [*spec.dimensions, *(["seed"] if spec.repeats > 1 else [])]
        return cls(uri, spec.name, folder, parent_params(spec), {**source_tags(), "sharetune.preset": spec.name},
                   searched=searched, dataset=dataset_of(spec), spec_yaml=spec.to_yaml(), description=spec.description)

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "client": None, "children": {}, "logged_steps": {}, "skipped_logged": set(), "running": set()}

    def setup(self, **info) -> None:
        self.client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(self.client, self.experiment)
        parent = find_parent(self.client, self.experiment_id, self.folder)
        if parent is None:
            tags = {**self.tags, SEARCH_TAG: str(self.folder), **({NOTE_TAG: self.description} if self.description else {})}
            run = self.client.create_run(self.experiment_id, run_name=self.folder.name, tags=tags)
            self.parent_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in self.params.items()]
            for batch in _batched(params):
                self.client.log_batch(self.parent_id, params=batch)
            if self.spec_yaml:
                self.client.log_text(self.parent_id, self.spec_yaml, "spec.yaml")
        else:
            self.parent_id = parent.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        children = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=10000)
        self.children = {run.data.tags[TRIAL_TAG]: run.info.run_id for run in children if TRIAL_TAG in run.data.tags}
        self.skipped_logged = {int(run.data.tags[CONFIGURATION_TAG]) for run in children if CONFIGURATION_TAG in run.data.tags}

    def _log_params(self, run_id: str, config: dict) -> None:
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        for batch in _batched(params):
            self.client.log_batch(run_id, params=batch)

    def log_skipped(self) -> None:
        """A finished child run for each proposal answered without training since the last call."""
        for entry in self.folder.skipped():
            number = entry["config"][CONFIGURATION]
            if number in self.skipped_logged:
                continue
            tags = {PARENT_TAG: self.parent_id, KIND_TAG: entry["kind"], CONFIGURATION_TAG: str(number)}
            if entry["kind"] == "duplicate":
                tags[DUPLICATE_TAG] = ",".join(entry["duplicate_of_trials"])
                name = f"duplicate of configuration {entry['duplicate_of']}"
            else:
                name = f"infeasible configuration {number}"
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            self._log_params(run_id, entry["config"])
            now = int(time.time() * 1000)
            costs = [Metric(k, float(v), now, 0) for k, v in entry.get("costs", {}).items() if k in METRICS]
            self.client.log_batch(run_id, metrics=costs)
            self.client.set_terminated(run_id, status="FINISHED")
            self.skipped_logged.add(number)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.log_skipped()  # the searcher answers those on its way to this trial
        self.running.add(trial.trial_id)
        if trial.trial_id in self.children:  # resumed: keep logging into the same run
            run_id = self.children[trial.trial_id]
            self.client.update_run(run_id, status="RUNNING")
            # An interrupt can land between a reported epoch and Tune's record of its checkpoint; that
            # epoch then trains again from the checkpoint before it. Log each epoch once. Every report,
            # the costs' at epoch 0 too, carries unique_params.
            history = self.client.get_metric_history(run_id, "unique_params")
            self.logged_steps[trial.trial_id] = max((m.step for m in history), default=-1)
            return
        tags = {**self.tags, PARENT_TAG: self.parent_id, TRIAL_TAG: trial.trial_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name(trial.config, self.searched, trial.trial_id),
                                     tags=tags)
        self.children[trial.trial_id] = run.info.run_id
        self._log_params(run.info.run_id, effective_params(trial.config))
        if self.dataset is not None:
            self.client.log_inputs(run.info.run_id, [DatasetInput(self.dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if STEP not in result:
            return
        now, step = int(time.time() * 1000), int(result[STEP])
        if step <= self.logged_steps.get(trial.trial_id, -1):
            return
        metrics = [Metric(k, float(result[k]), now, step) for k in METRICS if isinstance(result.get(k), (int, float))]
        tags = [RunTag("diverged", "true")] if result.get("diverged") else []
        self.client.log_batch(self.children[trial.trial_id], metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        diverged = bool((trial.last_result or {}).get("diverged"))
        self.client.set_terminated(self.children[trial.trial_id], status="FAILED" if diverged else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        run_id = self.children.get(trial.trial_id)
        if run_id is not None:
            self.client.set_tag(run_id, "error", trial_error(trial))
            self.client.set_terminated(run_id, status="FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        self.log_skipped()
        # Tune's clean-up after Ctrl-C (or a time limit) marks the running trials TERMINATED without
        # completing them; those, and any left PENDING, did not train to their end.
        unfinished = self.running | {t.trial_id for t in trials if t.status not in (FINISHED, FAILED)}
        for trial_id in unfinished & set(self.children):
            self.client.set_terminated(self.children[trial_id], status="KILLED")
        self.client.set_terminated(self.parent_id, status="KILLED" if unfinished else "FINISHED")
