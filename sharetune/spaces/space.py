"""Spec -> what Optuna samples: the define-by-run space and the sampler (from the sampler table)."""

from __future__ import annotations

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
    (alpha only for dirichlet, ...); returns the fixed settings, the family and the chosen variant's
    settings as constants. A class, not a closure, so Tune can pickle the searcher's state."""

    def __init__(self, spec: SearchSpec) -> None:
        self.spec = spec
        self.order = sorted(spec.dimensions, key=lambda name: bool(spec.condition(name)))

    def __call__(self, trial: optuna.Trial) -> dict:
        spec, chosen = self.spec, {}
        for name in self.order:
            known = {**spec.fixed, **chosen}
            if all(known.get(key) in values for key, values in spec.condition(name).items()):
                chosen[name] = suggest(trial, name, spec.dimensions[name])
        variant = chosen.get("variant", spec.fixed.get("variant"))
        return {"family": spec.family, **spec.fixed, **spec.variants.get(variant, {})}


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler with its `sampler_options` (seeded by the spec); bad options are a SpecError."""
    options = {"seed": spec.seed, **spec.sampler_options}
    try:
        return SAMPLERS[spec.sampler].build(spec, options)
    except (TypeError, ValueError, ImportError) as err:
        raise SpecError(f"sampler_options: {spec.sampler} sampler rejected {spec.sampler_options}: {err}") from None
