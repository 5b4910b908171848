"""Optuna's ask-and-tell behind Ray Tune's Searcher, one Optuna trial per configuration.

Ray's OptunaSearch maps one Tune trial to one Optuna trial. Here a configuration Optuna proposes is
- trained `repeats` times, with seeds seed, seed + 1, ...; Optuna is told the mean of their values;
- answered without training when it breaks the spec's `constraints`: its costs are known from the
  configuration alone. Optuna is told those costs and how far they break each bound (Trial.set_constraint,
  which NSGA-II, TPE, MOTPE and GP rank below every feasible trial); other objectives get their worst value;
- answered without training when Optuna proposed it before (NSGA-II does): it is told the first one's
  values once they are known.
Neither of the last two counts against num_samples: the searcher ends the search (Searcher.FINISHED)
once num_samples configurations have been started. They are written to the search folder's
SKIPPED_FILE, which the MLflow logger and the report read. Every trial's config carries its
configuration's number (CONFIGURATION), which groups repeats in reports; the Optuna trial lists
its Tune trials in the user attribute `tune_trials`, and in `mlflow_runs` the filters that find
their MLflow runs (pasted into the UI's search box; the runs' ids do not exist yet when the trial is
asked, and a finished Optuna trial cannot be changed).
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna
from ray.tune.search import Searcher

from sharetune.metrics import ModelCosts
from sharetune.search.mlflow_queue import runs_filters
from sharetune.search.storage import DUPLICATE_KIND, INFEASIBLE_KIND, SearchFolder
from sharetune.spaces import Bound, OptunaSpace, trial_settings

MAX_SKIPPED_IN_A_ROW = 100  # proposals answered without training before the space counts as exhausted
CONFIGURATION = "configuration"  # in every trial's config: its Optuna trial number, shared by its repeats


def duplicate_of(entry: dict) -> str:
    """What a skipped duplicate repeats: its first proposal's Tune trials, or that configuration where
    it trained none (it was infeasible)."""
    return ",".join(entry["duplicate_of_trials"]) or f"configuration {entry['duplicate_of']}"


@dataclass
class Configuration:
    """One Optuna trial and the Tune trials training it."""

    trial: optuna.Trial
    config: dict
    repeats_left: int
    results: list[list[float]] = field(default_factory=list)  # each finished repeat's objective values
    trial_ids: list[str] = field(default_factory=list)
    constraints: dict[str, float] = field(default_factory=dict)  # bound name -> violation (<= 0: feasible)
    values: list[float] | None = None  # what Optuna was told; None until then
    told: bool = False
    duplicates: list[optuna.Trial] = field(default_factory=list)  # re-proposals waiting for `values`


class ConfigurationSearcher(Searcher):
    def __init__(self, space: OptunaSpace, objectives: dict[str, str], study: optuna.Study, folder: SearchFolder, *,
                 num_samples: int, repeats: int, constraints: dict[str, Bound] | None = None,
                 costs: Callable[[dict], ModelCosts] | None = None, space_size: int | None = None) -> None:
        """`costs`: a configuration's costs before training (picklable: Tune saves the searcher);
        `space_size`: how many distinct configurations there are, where the space is finite (the
        search ends once each was proposed, trained or not)."""
        super().__init__()
        self.space, self.objectives, self.study, self.folder = space, dict(objectives), study, folder
        self.num_samples, self.repeats, self.space_size = num_samples, repeats, space_size
        self.bounds, self.costs = dict(constraints or {}), costs
        if self.bounds and costs is None:
            raise ValueError("constraints need a costs function")
        self.started = 0  # configurations handed to Tune
        self.queue: list[tuple[Configuration, int]] = []  # (configuration, repeat) not yet handed out
        self.by_params: dict[tuple, Configuration] = {}
        self.of_trial: dict[str, Configuration] = {}  # Tune trial id -> its configuration
        self.skipped: list[dict] = []

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the objectives come with the searcher

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.queue:
            if self.started >= self.num_samples:
                return Searcher.FINISHED
            configuration = self._propose()
            if configuration is None:
                return Searcher.FINISHED
            self.started += 1
            self.queue = [(configuration, repeat) for repeat in range(self.repeats)]
        configuration, repeat = self.queue.pop(0)
        configuration.trial_ids.append(trial_id)
        configuration.trial.set_user_attr("tune_trials", configuration.trial_ids)
        configuration.trial.set_user_attr("mlflow_runs", runs_filters(configuration.trial_ids))
        self.of_trial[trial_id] = configuration
        return self._seeded(configuration.config, repeat)

    def _seeded(self, config: dict, repeat: int) -> dict:
        return {**config, "seed": trial_settings(config).seed + repeat} if self.repeats > 1 else config

    def _propose(self) -> Configuration | None:
        """The next configuration to train; re-proposals and infeasible ones are answered on the way."""
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            if len(self.by_params) == self.space_size:  # every configuration proposed, the last infeasible
                return None
            trial = self.study.ask()
            config = {**self.space(trial), CONFIGURATION: trial.number}
            key = tuple(sorted(trial.params.items()))
            first = self.by_params.get(key)
            if first is not None:
                self._answer_duplicate(trial, config, first)
                continue
            configuration = Configuration(trial, config, repeats_left=self.repeats)
            self.by_params[key] = configuration
            if not self.bounds:
                return configuration
            costs = self.costs(config).as_dict()
            configuration.constraints = {name: bound.violation(costs[name]) for name, bound in self.bounds.items()}
            for name, violation in configuration.constraints.items():
                trial.set_constraint(name, violation)
            if max(configuration.constraints.values()) <= 0:
                return configuration
            self._tell(configuration, [float(costs[m]) if m in costs else self._worst(i) for i, m in enumerate(self.objectives)])
            self._record(INFEASIBLE_KIND, config, costs=costs, violations=configuration.constraints)
        warnings.warn(f"the sampler proposed {MAX_SKIPPED_IN_A_ROW} configurations in a row that were infeasible or "
                      f"already tried; the search ends with {self.started} configurations trained", stacklevel=2)
        return None

    def _worst(self, objective: int) -> float:
        """What an untrained configuration is told for a training metric: finite (GP fits every told
        value), and no better than any trial's; Optuna's constraints rank it below feasible ones anyway.
        Metrics to maximise are never negative (accuracies, entropy)."""
        if list(self.objectives.values())[objective] == "max":
            return 0.0
        told = [t.values[objective] for t in self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])]
        return max(told, default=0.0)

    def _answer_duplicate(self, trial: optuna.Trial, config: dict, first: Configuration) -> None:
        for name, violation in first.constraints.items():
            trial.set_constraint(name, violation)
        if first.told:
            self._tell_one(trial, first.values)
        else:
            first.duplicates.append(trial)
        self._record(DUPLICATE_KIND, config, duplicate_of=first.trial.number, duplicate_of_trials=first.trial_ids)

    def _record(self, kind: str, config: dict, **details) -> None:
        self.skipped.append({"kind": kind, "config": config, **details})
        self.folder.save_skipped(self.skipped)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        configuration = self.of_trial.pop(trial_id, None)
        if configuration is None or configuration.told:  # e.g. an errored trial retried by `resume`
            return
        values = [(result or {}).get(m) for m in self.objectives]
        if not error and all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            configuration.results.append([float(v) for v in values])
        configuration.repeats_left -= 1
        if configuration.repeats_left == 0:
            mean = np.mean(configuration.results, axis=0).tolist() if configuration.results else None
            self._tell(configuration, mean)

    def _tell(self, configuration: Configuration, values: list[float] | None) -> None:
        """Tell Optuna the configuration's values (None: every repeat failed) and its waiting re-proposals."""
        configuration.values, configuration.told = values, True
        for trial in [configuration.trial, *configuration.duplicates]:
            self._tell_one(trial, values)
        configuration.duplicates = []

    def _tell_one(self, trial: optuna.Trial, values: list[float] | None) -> None:
        if self.study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            return  # told before a crash the searcher's saved state does not know of (an RDB study)
        if values is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, values if len(values) > 1 else values[0])

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
