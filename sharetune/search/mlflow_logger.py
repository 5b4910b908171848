"""Tune -> MLflow: one parent run per search, one nested child run per trial, batched writes.

Ray's MLflowLoggerCallback makes flat runs, one request per metric, and blocks Tune's loop on the
network; this callback only appends to the search's durable queue (sharetune.search.mlflow_queue),
whose writer delivers through MlflowClient.log_batch, the same against a local SQLite store and a
remote tracking server, and waits out an outage. Runs are found again by tags, so a resumed search
adds no duplicates.
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

from mlflow.entities import Dataset, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)
from ray import tune

from sharetune.data import data_root
from sharetune.errors import without_passwords
from sharetune.metrics import METRICS, STEP
from sharetune.search.mlflow_queue import (
    CONFIGURATION_TAG,
    TRIAL_TAG,
    MlflowQueue,
    child_runs,
    search_parent,
)
from sharetune.search.outcome import FAILED, FINISHED, cut_short, trial_error
from sharetune.search.searcher import CONFIGURATION, duplicate_of
from sharetune.search.storage import DUPLICATE_KIND, SearchFolder
from sharetune.spaces import SearchSpec, trial_settings
from sharetune.spaces.locations import DEFAULT_STORE, expand_home

KIND_TAG = "sharetune.kind"  # infeasible | duplicate: a proposal answered without training
ERROR_TAG = "error"  # a failed trial's exception, in one line
DUPLICATE_TAG = "sharetune.duplicate_of"
CUT_TAG = "sharetune.cut"  # a trial the time limit ended before its last epoch (its run ends KILLED)
# The parent run's params that reports read back (`parent_params` writes them):
NAME_PARAM, DATASET_PARAM = "name", "dataset"
REFERENCE_PREFIX, DIMENSION_PREFIX = "hypervolume_reference.", "dimension."  # + a cost; + a searched setting
DIMENSIONS_PARAM = "dimensions"  # the searched settings, in the spec's order
DRAIN_S = float(os.environ.get("SHARETUNE_MLFLOW_WAIT_S", "60"))  # how long a search's end waits for MLflow


def tracking_uri(uri: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store ./mlflow.db."""
    return expand_home(uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}")


def parent_run_of(folder: SearchFolder) -> tuple[str, str | None]:
    """The folder's tracking URI and its search's parent run id (None if MLflow has no such run)."""
    uri, experiment = folder.mlflow()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parent = found and search_parent(client, found.experiment_id, folder)
    return uri, parent.info.run_id if parent else None


def trial_runs(uri: str, parent_id: str) -> dict[str, Run]:
    """A search's child runs of trained trials: trial id -> run (its tags included)."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = child_runs(client, parent.info.experiment_id, parent_id)
    return {run.data.tags[TRIAL_TAG]: run for run in children if TRIAL_TAG in run.data.tags}


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
    source = "generated" if spec.data.generated else str(data_root(spec.data.root))
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
    params = {NAME_PARAM: spec.name, "family": spec.family, DATASET_PARAM: spec.data.name, "sampler": spec.sampler,
              "objectives": ",".join(f"{k}:{v}" for k, v in spec.objectives.items()),
              "num_samples": spec.num_samples(), "scheduler": spec.scheduler.name if spec.scheduler else "none"}
    params.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    params.update({f"{REFERENCE_PREFIX}{k}": v for k, v in spec.hypervolume_reference.items()})
    params.update({f"{DIMENSION_PREFIX}{k}": f"{d.kind} {d.choice if d.kind == 'choice' else d.bounds()}" for k, d in spec.dimensions.items()})
    params[DIMENSIONS_PARAM] = ",".join(spec.dimensions)  # their order (MLflow returns params sorted by name)
    return params


def shown_spec(spec: SearchSpec) -> str:
    """The spec as its parent run shows it to everyone who reads the experiment: no database password."""
    if spec.optuna_storage is not None:
        spec = spec.model_copy(update={"optuna_storage": without_passwords(spec.optuna_storage)})
    return spec.to_yaml()


class MlflowLogger(tune.Callback):
    def __init__(self, uri: str, experiment: str, folder: SearchFolder, params: dict, tags: dict, *,
                 searched: list[str] = (), dataset: Dataset | None = None, spec_yaml: str = "",
                 description: str = "", time_limit_s: float | None = None) -> None:
        """`searched`: the settings that name a child run; `dataset`: what each child trains on;
        `spec_yaml` and `description`: the parent run's spec artifact and note; `time_limit_s`: the
        search's, which tells a trial it cut short from one Ctrl-C interrupted."""
        self.uri, self.experiment, self.folder = uri, experiment, folder
        self.params, self.tags = params, tags
        self.searched, self.dataset, self.spec_yaml, self.description = list(searched), dataset, spec_yaml, description
        self.queue: MlflowQueue | None = None
        self.skipped_logged: set[int] = set()  # configuration numbers queued by this driver
        self.running: set[str] = set()  # trials started and neither completed nor failed since
        self.time_limit_s, self.started = time_limit_s, 0.0  # started: when `setup` runs, as this driver starts
        self.earlier_s = 0.0  # what earlier drivers of the search spent (a resumed search's): Tune's limit counts it

    @classmethod
    def for_search(cls, spec: SearchSpec, folder: SearchFolder, uri: str) -> "MlflowLogger":
        searched = [*spec.dimensions, *(["seed"] if spec.repeats > 1 else [])]
        return cls(uri, spec.name, folder, parent_params(spec), source_tags(),
                   searched=searched, dataset=dataset_of(spec), spec_yaml=shown_spec(spec), description=spec.description,
                   time_limit_s=spec.budget.time_limit_s)

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "queue": None, "skipped_logged": set(), "running": set(), "earlier_s": self.spent_s(),
                "started": 0.0}

    def spent_s(self) -> float:
        """The search's time so far, over every driver that ran it."""
        return self.earlier_s + (time.monotonic() - self.started if self.started else 0.0)

    def setup(self, **info) -> None:
        self.started = time.monotonic()
        self.queue = MlflowQueue.of(self.folder, self.uri, self.experiment)
        tags = {**self.tags, **({MLFLOW_RUN_NOTE: self.description} if self.description else {})}
        self.queue.put("open_parent", name=self.folder.name, tags=tags, params=self.params, spec_yaml=self.spec_yaml)
        self.queue.start()

    def log_skipped(self) -> None:
        """A finished child run for each proposal answered without training since the last call."""
        for entry in self.folder.skipped():
            number = entry["config"][CONFIGURATION]
            if number in self.skipped_logged:
                continue
            tags = {KIND_TAG: entry["kind"], CONFIGURATION_TAG: str(number)}
            if entry["kind"] == DUPLICATE_KIND:
                tags[DUPLICATE_TAG] = duplicate_of(entry)
                name = f"duplicate of configuration {entry['duplicate_of']}"
            else:
                name = f"infeasible configuration {number}"
            costs = {k: float(v) for k, v in entry.get("costs", {}).items() if k in METRICS}
            self.queue.put("skipped", key=f"configuration:{number}", name=name, tags=tags, params=entry["config"], costs=costs)
            self.skipped_logged.add(number)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.log_skipped()  # the searcher answers those on its way to this trial
        self.running.add(trial.trial_id)
        self._open(trial)

    def _open(self, trial) -> None:
        """The trial's child run, found again where an earlier driver opened it."""
        dataset = self.dataset.to_dictionary() if self.dataset is not None else None
        self.queue.put("open_trial", key=f"trial:{trial.trial_id}", tags={**self.tags, TRIAL_TAG: trial.trial_id},
                       name=run_name(trial.config, self.searched, trial.trial_id),
                       params=effective_params(trial.config), dataset=dataset)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if STEP not in result:
            return
        metrics = {k: float(result[k]) for k in METRICS if isinstance(result.get(k), (int, float))}
        self.queue.put("metrics", key=f"trial:{trial.trial_id}", step=int(result[STEP]), timestamp=int(time.time() * 1000),
                       metrics=metrics, tags={"diverged": "true"} if result.get("diverged") else {})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        diverged = bool((trial.last_result or {}).get("diverged"))
        cut = not diverged and cut_short(trial)
        status = "FAILED" if diverged else "KILLED" if cut else "FINISHED"
        self.queue.put("end", key=f"trial:{trial.trial_id}", status=status, tags={CUT_TAG: "true"} if cut else {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.queue.put("end", key=f"trial:{trial.trial_id}", status="FAILED", tags={ERROR_TAG: trial_error(trial)})

    def on_experiment_end(self, trials, **info) -> None:
        self.log_skipped()
        # Tune's clean-up after Ctrl-C (or a time limit) marks the running trials TERMINATED without
        # completing them; those, and any left PENDING, did not train to their end.
        unfinished = self.running | {t.trial_id for t in trials if t.status not in (FINISHED, FAILED)}
        timed_out = self.time_limit_s is not None and self.spent_s() >= self.time_limit_s
        # stopped before their first epoch (Tune's clean-up marks them TERMINATED too)
        unstarted = [t for t in trials if t.status != FAILED and t.trial_id not in self.running and STEP not in (t.last_result or {})]
        if timed_out:  # such a trial gets a run too: the folder lists it, cut (an interrupted one trains on resume)
            for trial in unstarted:
                self._open(trial)
        unfinished |= {trial.trial_id for trial in unstarted}
        for trial_id in sorted(unfinished):
            self.queue.put("end", key=f"trial:{trial_id}", status="KILLED", tags={CUT_TAG: "true"} if timed_out else {})
        self.queue.put("end", key="parent", status="KILLED" if unfinished else "FINISHED", tags={})


def remove_orphans(folder: SearchFolder, recorded: list[str]) -> None:
    """Queue the removal of the runs of trials Tune's restored state never recorded; queued, it comes
    after every run the killed driver asked for."""
    MlflowQueue.of(folder, *folder.mlflow()).put("remove_orphans", recorded=recorded)


def deliver_backlog(folder: SearchFolder) -> int:
    """Wait up to DRAIN_S for the search's queued writes to reach MLflow; returns how many are
    still queued (0: MLflow holds everything)."""
    queue = MlflowQueue.of(folder, *folder.mlflow())
    queue.start()
    return queue.drain(DRAIN_S)
