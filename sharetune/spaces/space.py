"""Spec -> what Optuna samples: the define-by-run space and the sampler (from the sampler table)."""

from __future__ import annotations

import inspect
import random
import warnings
from typing import Any

import optuna

from sharetune.spaces.samplers import SAMPLERS
from sharetune.spaces.spec import Dimension, SearchSpec, SpecError


def suggest(trial: optuna.Trial, name: str, dim: Dimension) -> Any:
    if dim.kind == "choice":
        return trial.suggest_categorical(name, dim.choice)
    low, high = dim.bounds()
    if dim.kind in ("int", "logint"):
        return trial.suggest_int(name, int(low), int(high), step=int(dim.step or 1), log=dim.kind == "logint")
    return trial.suggest_float(name, low, high, step=dim.step, log=dim.kind == "loguniform")


class OptunaSpace:
    """Define-by-run space. Samples unconditional dimensions first, then those whose condition holds
    (alpha only for dirichlet, ...); returns the trial's whole config: the family and
    `SearchSpec.trial_config` (the one every check of the spec reads too). A class, not a closure, so Tune can pickle the searcher."""

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec
        self.conditions = {name: spec.condition(name) for name in spec.dimensions}  # read once: each reads signatures
        self.order = sorted(spec.dimensions, key=lambda name: bool(self.conditions[name]))

    def __call__(self, trial: optuna.Trial) -> dict:
        spec, chosen = self.spec, {}
        for name in self.order:
            known = {**spec.fixed, **chosen}
            if all(known.get(key) in values for key, values in self.conditions[name].items()):
                chosen[name] = suggest(trial, name, spec.dimensions[name])
        return {"family": spec.family, **spec.trial_config(chosen)}


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler with its `sampler_options` (seeded by the spec); bad options are a SpecError,
    without the notices Optuna gave while building it (a deprecated option's), which else come first."""
    options = {"seed": spec.seed, **spec.sampler_options}
    with warnings.catch_warnings(record=True) as noticed:  # as the filters let them through, shown once it is built
        try:
            sampler = SAMPLERS[spec.sampler].build(spec, options)
        except (TypeError, ValueError, ImportError) as err:
            raise SpecError(f"sampler_options: {spec.sampler} sampler rejected {spec.sampler_options}: {err}") from None
    parameters = inspect.signature(type(sampler)).parameters
    for name in spec.sampler_options:  # a spec's values are data: where Optuna takes a function, none fits
        if name in parameters and "Callable" in str(parameters[name].annotation):
            raise SpecError(f"sampler_options.{name}: the {spec.sampler} sampler takes a function there, which a spec "
                            "cannot give; leave it out for the sampler's own")
    for notice in noticed:
        warnings.showwarning(notice.message, notice.category, notice.filename, notice.lineno)
    return sampler


REHEARSAL_ROUNDS = 1  # trials past the warm-up: the first the sampler's own model proposes
MAX_REHEARSAL = 256  # a longer warm-up is rehearsed in part (a search that long meets the rest later)


def warmup_trials(sampler: optuna.samplers.BaseSampler, spec: SearchSpec) -> int:
    """Trials the sampler proposes before its model starts: its warm-up option, as given or its default."""
    option = SAMPLERS[spec.sampler].warmup_option
    if option is None:
        return 0
    given = spec.sampler_options.get(option, inspect.signature(type(sampler)).parameters[option].default)
    return given if isinstance(given, int) else 0  # another type fails in the rehearsal's first round


def rehearse_sampler(spec: SearchSpec) -> None:
    """Drive a fresh copy of the spec's sampler through its warm-up and the first trial its model
    proposes, on the spec's space, telling it made-up objective values, so options that fail only once
    its model starts (TPE's `n_ei_candidates: 0` at trial 11) fail before Ray starts; a warm-up longer than
    MAX_REHEARSAL is rehearsed in part. SpecError naming the option on failure."""
    sampler = make_sampler(spec)
    rounds = min(warmup_trials(sampler, spec) + REHEARSAL_ROUNDS, MAX_REHEARSAL)
    values, space = random.Random(spec.seed), OptunaSpace(spec)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=sampler, directions=spec.directions)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices, fallbacks to independent sampling
            while len(study.trials) < rounds:
                trial = study.ask()
                space(trial)
                study.tell(trial, [values.random() for _ in spec.objectives])
    except Exception as err:  # whatever the sampler raises on these options, the user fixes them
        raise SpecError(f"sampler_options: {spec.sampler} sampler with {spec.sampler_options} fails at trial "
                        f"{len(study.trials)} of a dry run: {type(err).__name__}: {err}") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
