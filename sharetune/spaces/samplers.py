"""The Optuna samplers a spec's `sampler` names: one table of name, builder and whether it handles
several objectives and constraints. The spec validates against it; `make_sampler` builds from it."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.samplers import nsgaii

if TYPE_CHECKING:
    from sharetune.spaces.spec import SearchSpec


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's exhaustive grid, with Tune deciding when the search ends (num_samples is the grid's
    size). Optuna's own would call `study.stop()` after the last cell, which raises outside
    `study.optimize` and so inside Tune's ask-and-tell loop."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable: Tune saves the searcher, the study and its sampler with the
    search's state, and Optuna's genetic samplers guard their generation cache with a thread lock."""

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_thread_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _thread_lock=threading.Lock())


# NSGA-II's operators on numeric parameters, by the name a spec gives (`sampler_options: {crossover: sbx}`).
# Optuna's default, uniform crossover, copies each value from a parent, so children repeat their parents'
# points; SBX (Deb's NSGA-II) with polynomial mutation proposes new values near them.
CROSSOVERS = {"uniform": nsgaii.UniformCrossover, "blxalpha": nsgaii.BLXAlphaCrossover, "sbx": nsgaii.SBXCrossover,
              "vsbx": nsgaii.VSBXCrossover, "spx": nsgaii.SPXCrossover, "undx": nsgaii.UNDXCrossover}
MUTATIONS = {"polynomial": nsgaii.PolynomialMutation}


def named(table: dict[str, type], option: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the operator named by `option` (a string) built from `table`."""
    if option not in options:
        return options
    name = options[option]
    if name not in table:
        raise ValueError(f"{option}: {name!r}; allowed: {', '.join(table)}")
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):  # their notices
        return {**options, option: table[name]()}


def nsga2(spec: SearchSpec, options: dict[str, Any]) -> NSGAIISampler:
    return NSGAIISampler(**named(MUTATIONS, "mutation", named(CROSSOVERS, "crossover", options)))


def grid(spec: SearchSpec) -> dict[str, list]:
    """The grid sampler's cells: every dimension is a `choice` (the spec checks)."""
    return {name: list(dim.choice) for name, dim in spec.dimensions.items()}


@dataclass(frozen=True)
class SamplerEntry:
    build: Callable[[SearchSpec, dict[str, Any]], optuna.samplers.BaseSampler]  # (spec, options with the seed)
    multi_objective: bool
    warmup_option: str | None = None  # the option counting the trials before its model proposes (random ones)
    constrained: bool = True  # ranks a trial that breaks the spec's constraints below feasible ones (or learns nothing)


SAMPLERS: dict[str, SamplerEntry] = {
    "tpe": SamplerEntry(lambda spec, kw: optuna.samplers.TPESampler(**kw), True, "n_startup_trials"),
    "random": SamplerEntry(lambda spec, kw: optuna.samplers.RandomSampler(**kw), True),
    "grid": SamplerEntry(lambda spec, kw: GridSampler(grid(spec), **kw), True),  # exhaustive: the paper sweeps
    "gp": SamplerEntry(lambda spec, kw: optuna.samplers.GPSampler(**kw), True, "n_startup_trials"),
    "cmaes": SamplerEntry(lambda spec, kw: optuna.samplers.CmaEsSampler(**kw), False, "n_startup_trials", constrained=False),
    "nsga2": SamplerEntry(nsga2, True, "population_size"),
    "motpe": SamplerEntry(lambda spec, kw: optuna.samplers.TPESampler(**{"multivariate": True, **kw}), True,
                          "n_startup_trials"),
}
MULTI_OBJECTIVE_SAMPLERS = tuple(name for name, entry in SAMPLERS.items() if entry.multi_objective)
