"""Optuna samplers by name, as the spec's `sampler` field selects them (options: `sampler_options`)."""

from __future__ import annotations

from typing import Callable

import optuna

from sharetune.spaces.space import grid
from sharetune.spaces.spec import SearchSpec, SpecError



class GridSampler(optuna.samplers.GridSampler):
    """Optuna's exhaustive grid, with Tune deciding when the search ends (num_samples is the grid's
    size). Optuna's own would call `study.stop()` after the last cell, which raises outside
    `study.optimize` and so inside Tune's ask-and-tell loop."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


Builder = Callable[[SearchSpec, dict], optuna.samplers.BaseSampler]

SAMPLERS: dict[str, Builder] = {
    "tpe": lambda spec, kw: optuna.samplers.TPESampler(**kw),
    "motpe": lambda spec, kw: optuna.samplers.TPESampler(**{"multivariate": True, **kw}),  # multi-objective TPE
    "random": lambda spec, kw: optuna.samplers.RandomSampler(**kw),
    "grid": lambda spec, kw: GridSampler(grid(spec), **kw),  # exhaustive: the paper sweeps
    "gp": lambda spec, kw: optuna.samplers.GPSampler(**kw),
    "cmaes": lambda spec, kw: optuna.samplers.CmaEsSampler(**kw),
    "nsga2": lambda spec, kw: optuna.samplers.NSGAIISampler(**kw),
}


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    options = {"seed": spec.seed, **spec.sampler_options}
    try:
        return SAMPLERS[spec.sampler](spec, options)
    except (TypeError, ValueError, ImportError) as err:
        raise SpecError(f"sampler_options: {spec.sampler} sampler rejected {spec.sampler_options}: {err}") from None
