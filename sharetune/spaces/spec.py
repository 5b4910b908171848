"""A search spec: what to search, how, and with what budget. YAML in, validated model out.

    name: arbnet-dirichlet
    family: arbnet                  # arbnet | spin
    data: {name: mnist}
    fixed: {hash: dirichlet, table_size: 1000, epochs: 3}
    dimensions:
      alpha: {loguniform: [0.001, 1000]}
      sparsity: {choice: [0.0, 0.5, 0.9]}
    objectives: {test_accuracy: max, unique_params: min}
    sampler: nsga2
    budget: {num_samples: 16, max_concurrent: 2}

Every fixed value and every value a dimension can take is checked against the family's settings
(sharetune.spaces.settings) before Ray starts; errors name the field and the allowed values.
"""

from __future__ import annotations

import builtins
import copy
import functools
import itertools
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sharetune.data import (
    DEFAULT_DATASET,
    DEFAULT_IMG_SIZE,
    DEFAULT_VAL_FRACTION,
    GENERATED,
    DataError,
    canonical_name,
    data_root,
)
from sharetune.metrics import CONSTRAINABLE, COSTS, METRICS
from sharetune.recipes import ACCEPTED, MAX_SEED, Seed, accepted
from sharetune.spaces.documents import MAX_BYTES, SpecError, check_tree, load_yaml
from sharetune.spaces.locations import check_database_url, safe_name
from sharetune.spaces.samplers import MULTI_OBJECTIVE_SAMPLERS, SAMPLERS
from sharetune.spaces.settings import FAMILIES, FamilySettings, SpinSettings
from sharetune.spaces.suggest import did_you_mean, nearest_path, spec_paths

Scalar = Union[bool, int, float, str, None]
KINDS = ("choice", "uniform", "loguniform", "int", "logint")
COUNTED_COMBINATIONS = 100_000  # more than this, and a space is not counted (a search of it ends by its budget)
MAX_EXTREME_COMBINATIONS = 4096  # more than this, and the extremes vary one dimension at a time
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # every spec section: no unknown keys, no inf or nan


class Dimension(BaseModel):
    """One searched setting: exactly one of choice, uniform, loguniform, int, logint."""

    model_config = STRICT

    choice: Optional[list[Scalar]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    int: Optional[tuple[builtins.int, builtins.int]] = None
    logint: Optional[tuple[builtins.int, builtins.int]] = None
    step: Optional[float] = Field(None, gt=0)
    when: Optional[dict[str, list[Scalar]]] = None  # sample only when these settings have these values

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        if sum(getattr(self, k) is not None for k in KINDS) != 1:
            raise ValueError(f"give exactly one of: {', '.join(KINDS)}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: needs at least one value")
        low_high = self.bounds()
        if low_high and low_high[0] > low_high[1]:
            raise ValueError(f"{self.kind}: low {low_high[0]} is above high {low_high[1]}")
        if self.kind in ("loguniform", "logint") and low_high[0] <= 0:
            raise ValueError(f"{self.kind}: bounds must be > 0")
        if self.step is not None and self.kind not in ("uniform", "int"):
            raise ValueError(f"step: applies to uniform and int only, not {self.kind} (Optuna samples a log scale without steps)")
        if self.step is not None and self.kind == "int" and self.step != builtins.int(self.step):
            raise ValueError(f"step: int needs a whole step, got {self.step}")
        if self.step is not None:  # in decimals, as Optuna reads them (0.3 - 0.1 is 0.2 there)
            width = Decimal(str(low_high[1])) - Decimal(str(low_high[0]))
            if 0 < width < Decimal(str(self.step)):  # Optuna would sample `low` alone
                raise ValueError(f"step: {self.step:g} is wider than {self.kind} [{low_high[0]:g}, {low_high[1]:g}], which "
                                 f"leaves one value; allowed: up to {width}")
        return self

    def can_be(self, values: list[Scalar]) -> bool:
        """Whether a sample can take one of `values` (what a `when` on this dimension asks)."""
        if self.choice is not None:
            return any(value in values for value in self.choice)
        low, high = self.bounds()
        numbers = [v for v in values if isinstance(v, (builtins.int, float)) and not isinstance(v, bool) and low <= v <= high]
        return any(v == builtins.int(v) for v in numbers) if self.kind in ("int", "logint") else bool(numbers)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def bounds(self) -> tuple[float, float] | None:
        return None if self.kind == "choice" else getattr(self, self.kind)

    def extremes(self) -> list[Scalar]:
        """Values that, if valid, make every value of the dimension valid (settings are intervals)."""
        return list(self.choice) if self.choice is not None else list(self.bounds())

    def values(self) -> Sequence[Scalar] | None:
        """Every value a discrete dimension takes (an integer one's as a range: a seed's has 2**32); None
        for a continuous one."""
        if self.kind == "choice":
            return list(self.choice)
        if self.kind in ("int", "logint"):
            low, high = self.bounds()
            return range(low, high + 1, int(self.step or 1))
        return None


class Budget(BaseModel):
    model_config = STRICT

    num_samples: Optional[int] = Field(None, ge=1)  # default: the grid's size, else 16
    max_concurrent: Optional[int] = Field(None, ge=1)
    time_limit_s: Optional[float] = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker or node dies, from its last checkpoint


class Resources(BaseModel):
    model_config = STRICT

    cpu: float = Field(1.0, gt=0)  # per worker
    gpu: float = Field(0.0, ge=0)  # per worker; fractions share one GPU between trials (or workers)
    workers: int = Field(1, ge=1)  # >1: each trial is a Ray Train data-parallel job of this many workers

    @property
    def threads(self) -> int:
        """The torch threads and data loader workers of one worker: its CPUs, at least one."""
        return max(1, int(self.cpu))


class Bound(BaseModel):
    """A constraint on a cost known before training: proposals outside [min, max] are never trained."""

    model_config = STRICT

    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _some_bound(self) -> "Bound":
        if self.min is None and self.max is None:
            raise ValueError("give max, min or both")
        if any(v is not None and not math.isfinite(v) for v in (self.min, self.max)):
            raise ValueError("bounds must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.max is not None and self.max < 0:
            raise ValueError(f"max {self.max}: costs are never negative, so no proposal would meet it; allowed: 0 or more")
        return self

    def violation(self, value: float) -> float:
        """How far `value` lies outside the bounds, relative to them (Optuna's convention: <= 0 is feasible)."""
        over = (value - self.max) / max(abs(self.max), 1.0) if self.max is not None else -math.inf
        under = (self.min - value) / max(abs(self.min), 1.0) if self.min is not None else -math.inf
        return max(over, under)


class DataSpec(BaseModel):
    model_config = STRICT

    name: str = DEFAULT_DATASET
    root: Optional[str] = None  # default: ./data or $SHARETUNE_DATA
    train_subset: Optional[int] = Field(None, ge=1)  # reduced scale: the first N training examples
    test_subset: Optional[int] = Field(None, ge=1)
    label_noise: float = Field(0.0, ge=0, le=1)
    seed: Seed = 0
    val_fraction: float = Field(DEFAULT_VAL_FRACTION, ge=0, lt=1)  # held out of train for selection; 0: none
    img_size: int = Field(DEFAULT_IMG_SIZE, ge=8)  # imagefolder: the resolution images are cropped and resized to
    workers: Optional[int] = Field(None, ge=0)  # imagefolder: DataLoader workers (default: the trial's CPUs)

    @field_validator("name", mode="before")
    @classmethod
    def _known(cls, value):
        """One of the datasets (`--set data.name=` gives none); the message names them."""
        try:
            canonical_name(value if isinstance(value, str) else repr(value))
        except DataError as err:
            raise ValueError(err.message) from None
        return value

    @property
    def generated(self) -> bool:
        """Made from the seed (any spelling of the name), not read from files under `root`."""
        return canonical_name(self.name) in GENERATED


class Scheduler(BaseModel):
    """Early stopping: asha (one objective) or moasha (several; sharetune.search.moasha)."""

    model_config = STRICT

    name: Literal["asha", "moasha"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs before the first rung
    reduction_factor: float = Field(3, gt=1)
    max_t: Optional[int] = Field(None, ge=1)  # epochs of a full trial; default: the spec's most epochs


class SearchSpec(BaseModel):
    model_config = STRICT

    name: str = "search"  # the search folder's name and MLflow's experiment: a safe folder name
    description: str = ""
    family: Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
    data: DataSpec = DataSpec()
    fixed: dict[str, Any] = {}
    dimensions: dict[str, Dimension] = {}
    objectives: dict[str, Literal["max", "min"]] = {"val_accuracy": "max"}
    sampler: Literal[tuple(SAMPLERS)] = "tpe"  # type: ignore[valid-type]
    sampler_options: dict[str, Any] = {}
    scheduler: Optional[Scheduler] = None
    budget: Budget = Budget()
    resources: Resources = Resources()
    seed: Seed = 0
    optuna_storage: Optional[str] = None  # an RDB URL (sqlite:///optuna.db) so optuna-dashboard can show the study
    variants: dict[str, dict[str, Any]] = {}  # named bundles of settings a `variant` dimension picks
    # The reference costs hypervolumes are measured from (default: the dense, unshared model's)
    hypervolume_reference: dict[str, float] = {}
    constraints: dict[str, Bound] = {}  # costs known before training: {unique_params: {max: 50000}}
    repeats: int = Field(1, ge=1)  # seeds each configuration trains with (seed, seed+1, ...); the sampler sees the mean
    _accepted: bool = PrivateAttr(False)  # a saved search's spec (ACCEPTED): its settings parse as they were accepted

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return safe_name(value)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _null_removes(cls, value):
        """A dimension set to null is left out: how `--set dimensions.radius=null` drops a preset's."""
        return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value

    @field_validator("optuna_storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        return value if value is None else check_database_url(value)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "SearchSpec":
        self._accepted = accepted(info)
        if not self.objectives:
            raise ValueError("objectives: list at least one metric")
        for metric in self.objectives:
            if metric not in METRICS:
                raise ValueError(f"objectives: unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        for cost, value in self.hypervolume_reference.items():
            if cost not in COSTS or not value > 0:
                raise ValueError(f"hypervolume_reference: {cost}: {value!r}; give a cost above 0 for any of {', '.join(COSTS)}")
        for cost in self.constraints:
            if cost not in CONSTRAINABLE:
                raise ValueError(f"constraints: {cost!r} is not known before training; allowed: {', '.join(CONSTRAINABLE)}")
        if self.repeats > 1 and "seed" in self.dimensions:
            raise ValueError("repeats: the seed is searched (dimensions.seed); repeats vary it themselves, so keep one")
        if self.repeats > 1 and self.scheduler is not None and not self._accepted:
            raise ValueError(f"repeats: {self.scheduler.name} would stop a configuration's seeds at different epochs, and "
                             "their mean would mix them; allowed with a scheduler: repeats 1")
        if self.constraints and not SAMPLERS[self.sampler].constrained and not self._accepted:
            raise ValueError(f"constraints: the {self.sampler} sampler ignores them, and would learn from infeasible "
                             f"configurations' stand-in values; allowed: {', '.join(n for n, e in SAMPLERS.items() if e.constrained)}")
        if "val_accuracy" in self.objectives and not self.data.val_fraction:
            raise ValueError("objectives: val_accuracy needs a val split; set data.val_fraction > 0 (e.g. 0.1)")
        multi = self.multi_objective
        if multi and self.scheduler is not None and self.scheduler.name == "asha":
            raise ValueError("scheduler: ASHA prunes on one metric; for several objectives use name: moasha")
        if not multi and self.scheduler is not None and self.scheduler.name == "moasha":
            raise ValueError("scheduler: moasha ranks several objectives; for one objective use name: asha")
        if multi and not SAMPLERS[self.sampler].multi_objective:
            raise ValueError(f"sampler: {self.sampler} is single-objective; for several objectives use "
                             f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
        settings = FAMILIES[self.family]
        allowed = [*settings.model_fields, "variant"]
        for section, names in (("fixed", self.fixed), ("dimensions", self.dimensions)):
            name = next((name for name in names if name not in allowed), None)
            if name is not None:
                raise ValueError(f"{section}.{name}: not {'an' if self.family[0] in 'aeiou' else 'a'} {self.family} setting; "
                                 f"{did_you_mean(name, allowed)}allowed: {', '.join(allowed)}")
        overlap = set(self.fixed) & set(self.dimensions)
        if overlap:
            raise ValueError(f"{sorted(overlap)[0]}: both fixed and searched; keep it in one place")
        self._check_variants()
        self._check_values()
        if self.scheduler is not None:  # the trials' epochs are valid by now
            most = self.max_epochs()
            if self.scheduler.max_t and self.scheduler.max_t > most and not self._accepted:
                raise ValueError(f"scheduler.max_t: {self.scheduler.max_t} epochs is more than any trial trains "
                                 f"({most}); allowed: up to {most}, or leave it out")
            full = self.scheduler_max_t()
            if full < 2:  # a rung is an epoch before the last: there is none to stop a trial at
                raise ValueError(f"scheduler: early stopping needs a full trial of 2 epochs or more (here {full}); "
                                 "give more epochs, or scheduler: null")
            if self.scheduler.grace_period >= full:
                raise ValueError(f"scheduler.grace_period: {self.scheduler.grace_period} epochs leaves no rung below a full "
                                 f"trial's {full}; give fewer than {full}")
        if self.sampler == "grid":
            for name, dim in self.dimensions.items():
                if dim.kind != "choice" or self.condition(name):
                    raise ValueError(f"dimensions.{name}: the grid sampler needs unconditional `choice` dimensions")
        return self

    def _variant_names(self) -> list:
        """The variants a trial can pick: the `variant` dimension's choices, or the fixed one."""
        return self.dimensions["variant"].choice if "variant" in self.dimensions else [self.fixed["variant"]] if "variant" in self.fixed else []

    def _check_variants(self) -> None:
        names = self._variant_names()
        if names is None:
            raise ValueError("dimensions.variant: must be a `choice` of variant names")
        for name in names:
            if name not in self.variants:
                raise ValueError(f"variant: unknown variant {name!r}; allowed: {', '.join(self.variants) or '(none defined)'}")

    def condition(self, name: str) -> dict[str, list[Scalar]]:
        """The settings this dimension depends on: its own `when`, or, where the setting it depends on
        is searched, the family's (alpha only for the dirichlet hash, ...)."""
        dim = self.dimensions.get(name)
        if dim is not None and dim.when is not None:
            return dim.when
        built_in = FAMILIES[self.family].conditions().get(name, {})
        return {key: values for key, values in built_in.items() if key in self.dimensions}

    def _check_values(self) -> None:
        """Validate every combination of dimension extremes (and variant) with the fixed settings."""
        for name, dim in self.dimensions.items():
            for key in dim.when or {}:
                if key not in self.dimensions and key not in self.fixed:
                    raise ValueError(f"dimensions.{name}.when: {key!r} is neither fixed nor searched")
        for name in [n for n in self.variants if n not in self._variant_names()]:  # never picked: checked all the same
            for combo in self._extreme_combos():
                try:
                    self._resolve({**combo, "variant": name}, lambda loc, name=name: ".".join(["variants", name, *map(str, loc)]))
                except ValueError as err:
                    raise ValueError(f"{err} (no trial picks variant {name}; variants: {{}} leaves a preset's out)") from None
        extremes = self.extreme_settings()
        for settings in extremes:  # each value first (an unknown hash), then what they leave unsampled
            self._check_pretrained(settings)
            if settings.precision == "fp16" and not self.resources.gpu:
                raise ValueError("precision: fp16 needs GPUs, and this search's trials run on CPUs (resources.gpu: 0); "
                                 "allowed: fp32, bf16")
            if settings.seed + self.repeats - 1 > MAX_SEED:  # repeats train with seed, seed+1, ...
                raise ValueError(f"repeats: {self.repeats} seeds from seed {settings.seed} pass the largest seed, {MAX_SEED}; "
                                 f"allowed: a seed up to {MAX_SEED - self.repeats + 1}")
            if settings.batch_size < 2 * self.resources.workers and not self._accepted:  # BatchNorm needs two examples
                raise ValueError(f"batch_size: {settings.batch_size} gives some of resources.workers: {self.resources.workers} "
                                 f"fewer than two examples a step; allowed: {2 * self.resources.workers} or more")
        self._check_pretraining(extremes)
        self._check_read(extremes)
        for name in self.dimensions:
            for key, values in self.condition(name).items():
                possible = self.dimensions[key].can_be(values) if key in self.dimensions else self.fixed.get(key) in values
                if not possible:
                    raise ValueError(f"dimensions.{name}.when: {key} can never be any of {values}, so {name} would never be "
                                     f"sampled; allowed: values {key} can take, or leave {name} out (dimensions.{name}: null)")

    def extreme_settings(self) -> list[FamilySettings]:
        """One trial's settings per combination of dimension extremes (and variant) with the fixed
        settings: since every setting's allowed values are intervals, what all trials range over."""
        return [self._resolve(combo, functools.partial(self._where, combo)) for combo in self._extreme_combos()]

    def _extremes_combined(self) -> bool:
        """Whether the extremes are every combination of the dimensions' (else, for huge grids, each dimension's alone)."""
        return math.prod(len(dim.extremes()) for dim in self.dimensions.values()) <= MAX_EXTREME_COMBINATIONS

    def _extreme_combos(self) -> list[dict[str, Scalar]]:
        names = list(self.dimensions)
        options = [self.dimensions[n].extremes() for n in names]
        if not self._extremes_combined():  # huge grids: each dimension on its own
            return [dict({n: v}) for n, o in zip(names, options) for v in o] or [{}]
        return [dict(zip(names, values)) for values in itertools.product(*options)] or [{}]

    def pretraining_settings(self) -> SpinSettings | None:
        """The one unshared model that the trials which fuse or map by cka start from, and how it
        pretrains: the fixed settings, their sharing left out; None where no trial needs it."""
        if not any(s.needs_pretrained() for s in self.extreme_settings()):
            return None
        return self._unshared_settings()

    def _unshared_settings(self) -> SpinSettings:
        unshared = {k: v for k, v in self._config({}).items() if k not in SpinSettings.SHARING}
        return SpinSettings.model_validate(unshared, context=ACCEPTED if self._accepted else None)

    def _check_read(self, extremes: list[FamilySettings]) -> None:
        """A SPIN setting the spec gives that no trial reads (a sharing plan's option at share_rate 1) is
        refused: it looks searched or set, and changes nothing."""
        if self.family != "spin" or self._accepted or not self._extremes_combined():
            return  # (a huge grid's extremes vary one dimension at a time: they miss trials that read it)
        picked = [self.variants.get(name, {}) for name in self._variant_names()]
        given = {*self.fixed, *self.dimensions, *(name for settings in picked for name in settings)}
        unused = [settings.unused(given) for settings in extremes]
        for name, where in unused[0].items():
            if all(name in each for each in unused):
                place = self._varied(name) or f"fixed.{name}"
                raise ValueError(f"{place}: no trial of this search reads it (it applies {where}); leave {name} out "
                                 f"(--set {place}=null)")

    def _check_pretraining(self, extremes: list[FamilySettings]) -> None:
        """One unshared model is pretrained per search, from the fixed settings: how it pretrains is
        fixed, and every trial that starts from it (among `extremes`) builds the same network."""
        for name in ("pretrain_epochs", "pretrained"):
            if (place := self._varied(name)) is not None:
                raise ValueError(f"{place}: the search pretrains one unshared model for all its trials; give {name} in fixed")
        fusing = [settings for settings in extremes if settings.needs_pretrained()]
        if not fusing:
            return
        pretraining = self._unshared_settings()
        for settings in fusing:
            if settings.unshared_model() != pretraining.unshared_model():
                name = next(name for name in ("model", *SpinSettings.ARCHITECTURE)
                            if getattr(settings, name) != getattr(pretraining, name))
                fixed = "the model's default" if getattr(pretraining, name) is None else getattr(pretraining, name)
                raise ValueError(f"{self._varied(name) or name}: the trials that fuse or map by cka start from one "
                                 f"unshared model, pretrained with the fixed settings ({name}: {fixed}), so {name} is "
                                 "fixed for them; give it in fixed, or search it only where no trial fuses")

    def _varied(self, name: str) -> str | None:
        """Where a setting varies across trials (`dimensions.x`, `variants.v.x`); None where it is fixed."""
        if name in self.dimensions:
            return f"dimensions.{name}"
        return next((f"variants.{variant}.{name}" for variant, settings in self.variants.items() if name in settings), None)

    def trial_config(self, sampled: dict[str, Scalar]) -> dict:
        """The settings of a trial that samples `sampled`: the fixed ones and the samples, less those its
        conditions turn off (a fixed alpha where the hash sampled is not dirichlet), and its variant's."""
        config = {**self.fixed, **sampled}
        config = {k: v for k, v in config.items() if not self._inactive(k, config)}
        return {**config, **self.variants.get(config.get("variant"), {})}

    def _config(self, combo: dict[str, Scalar]) -> dict:
        """`trial_config` as the settings read it (the variant's name is no setting)."""
        return {k: v for k, v in self.trial_config(combo).items() if k != "variant"}

    def _resolve(self, combo: dict[str, Scalar], where: Callable[[tuple], str]) -> FamilySettings:
        """The settings of a trial that samples `combo`; errors name the field as `where` spells it."""
        config = self._config(combo)
        try:
            return FAMILIES[self.family].model_validate(config, context=ACCEPTED if self._accepted else None)
        except ValidationError as err:
            raise ValueError(describe_error(err, where=where)) from None

    def _where(self, combo: dict[str, Scalar], loc: tuple) -> str:
        """Where the spec gives the setting at `loc` of a trial that samples `combo` (its variant's first)."""
        if not loc:
            return ""
        variant = {**self.fixed, **combo}.get("variant")
        section = (["variants", variant] if loc[0] in self.variants.get(variant, {}) else
                   ["dimensions"] if loc[0] in self.dimensions else ["fixed"])
        return ".".join([*section, *map(str, loc)])

    def _inactive(self, name: str, config: dict, conditions: dict[str, dict] | None = None) -> bool:
        """Whether `name`'s condition turns it off in `config`; `conditions`: each dimension's, read once
        by a caller that asks for many configs (reading one reads the family's signatures)."""
        condition = self.condition(name) if conditions is None else conditions[name]
        return any(config.get(key) not in values for key, values in condition.items())

    def _check_pretrained(self, settings) -> None:
        if not isinstance(settings, SpinSettings):
            return
        if settings.needs_pretrained() and not (settings.pretrained or settings.pretrain_epochs):
            needs = "fusion" if settings.fusion is not None else "mapping: 'cka'"
            raise ValueError(f"{needs}: needs pretrained weights; set pretrained (a state_dict file) or pretrain_epochs > 0")
        if settings.pretrained and not Path(settings.pretrained).is_file():
            raise ValueError(f"pretrained: no such file {settings.pretrained}")

    @property
    def directions(self) -> list[str]:
        """The objectives' directions as Optuna's studies take them."""
        return [f"{mode}imize" for mode in self.objectives.values()]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def grid_size(self) -> int:
        return math.prod(len(d.choice) for d in self.dimensions.values())

    def distinct_configurations(self) -> int | None:
        """How many different configurations the space holds (a dimension its condition turns off
        counts once), so a search can end when it has proposed them all; None when a dimension is
        continuous or there are more than COUNTED_COMBINATIONS combinations to count."""
        names = list(self.dimensions)
        values = [self.dimensions[name].values() for name in names]
        if any(v is None for v in values) or math.prod(len(v) for v in values) > COUNTED_COMBINATIONS:
            return None
        distinct, conditions = set(), {name: self.condition(name) for name in names}
        for combo in itertools.product(*values):
            config = {**self.fixed, **dict(zip(names, combo))}
            distinct.add(tuple((name, value) for name, value in zip(names, combo) if not self._inactive(name, config, conditions)))
        return len(distinct)

    def ran_out(self, proposed: int) -> bool:
        """Whether `proposed` different configurations are all the space holds (a finite space)."""
        return proposed >= (self.distinct_configurations() or math.inf)

    def num_samples(self) -> int:
        if self.budget.num_samples is not None:
            return self.budget.num_samples
        return self.grid_size() if self.sampler == "grid" else 16

    def planned_trials(self) -> int:
        """Tune trials the search trains: each configuration `repeats` times."""
        return self.num_samples() * self.repeats

    def expected_trials(self) -> int:
        """`planned_trials`, or fewer where a finite space holds fewer configurations than the budget
        asks for (the searcher stops once it has proposed each)."""
        return min(self.num_samples(), self.distinct_configurations() or math.inf) * self.repeats

    def max_epochs(self) -> int:
        """The most epochs a trial trains (settings are intervals: the most of the extremes')."""
        return max(settings.epochs for settings in self.extreme_settings())

    def scheduler_max_t(self) -> int:
        """The epochs of a full trial, for early stopping: the scheduler's max_t, else the most any trial trains."""
        return (self.scheduler and self.scheduler.max_t) or self.max_epochs()

    def with_data_root(self) -> "SearchSpec":
        """The spec as its search saves it: data read from files names its folder as the absolute path it
        is where the search starts, so a `resume` from another directory, or a submitted search's driver
        on the cluster, reads the same data."""
        if self.data.generated:
            return self
        return self.model_copy(update={"data": self.data.model_copy(update={"root": str(data_root(self.data.root))})})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False, default_flow_style=None,
                              allow_unicode=True)  # escaped, a spec's non-ASCII text took twice the bytes


RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
MAX_PROBLEMS = 5  # a line lists this many; a file that is no spec at all would otherwise be echoed whole


def describe_error(err: ValidationError, where: Callable[[tuple], str] = lambda loc: ".".join(map(str, loc)),
                   *, value_last: bool = False) -> str:
    """One line for all problems: 'field.path: got X; message' (`value_last`: 'field: message, got X',
    which reads better for a command-line option)."""
    lines = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "literal_error":
            message = f"allowed: {problem['ctx']['expected']}"
        elif problem["type"] == "extra_forbidden":
            section, _, _ = where(problem["loc"]).rpartition(".")
            suggestion = nearest_path(where(problem["loc"]), spec_paths(SearchSpec, FAMILIES.values()))
            if suggestion and suggestion.startswith("fixed.") and section.startswith("variants."):  # a variant's setting
                suggestion = f"{section}.{suggestion.removeprefix('fixed.')}"
            message = "unknown key" + (f"; did you mean {suggestion}?" if suggestion else "")
        elif problem["type"] == "missing" and len(problem["loc"]) == 1 and problem["loc"][0] in SearchSpec.model_fields:
            choices = get_args(SearchSpec.model_fields[problem["loc"][0]].annotation)  # a Literal's values
            message = "required" + (f"; allowed: {', '.join(map(str, choices))}" if all(isinstance(c, str) for c in choices) and choices else "")
        elif problem["type"] in RANGE_ERRORS:
            message = f"{message[0].lower()}{message[1:]}"
        if problem["type"] == "literal_error" or problem["type"] in RANGE_ERRORS:  # say what was given
            got = repr(problem["input"])
            message = f"{message}, got {got}" if value_last else f"got {got}; {message}"
        path = where(problem["loc"])
        names, sep, rest = message.partition(": ")
        if not path and sep and all(name.isidentifier() for name in names.split(", ")):  # a model's own check names its settings
            path, message = ", ".join(where((name,)) for name in names.split(", ")), rest
        lines.append(f"{path}: {message}" if path else message)
    return joined(lines)


def joined(problems: list[str]) -> str:
    """Problems in one line: the first MAX_PROBLEMS, and how many more."""
    more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    return "; ".join(problems[:MAX_PROBLEMS]) + more


def check_document(raw: Any) -> None:
    """A spec document is a mapping within the limits of `check_tree`."""
    if not isinstance(raw, dict):
        raise SpecError("spec: expected a mapping of keys (name, family, dimensions, ...)")
    check_tree(raw)


def parse_spec(raw: dict, *, saved: bool = False) -> SearchSpec:
    """Validate a spec dict; raise SpecError naming the field and what is allowed. `saved`: a search
    folder's spec, accepted when its search started (ACCEPTED)."""
    check_document(raw)
    try:
        return SearchSpec.model_validate(raw, context=ACCEPTED if saved else None)
    except ValidationError as err:
        raise SpecError(describe_error(err)) from None


MOVES = {"dimensions": "fixed", "fixed": "dimensions"}  # a setting --set puts in one leaves the other


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set a.b=value` edits: the value is parsed as YAML (numbers, lists, null). A setting set as
    a dimension leaves `fixed`, and one fixed leaves `dimensions`: `--set dimensions.dim=...` searches
    what a preset fixes. Either leaves every variant too, whose value would otherwise replace it for
    that variant's trials: `--set fixed.dim=16` makes the scaling preset's nets 16 wide. A dimension
    set to null is only dropped: `fixed`'s value, set before or after, stays; a fixed setting set to
    null is left out everywhere (each trial takes its default)."""
    check_document(raw)
    raw = copy.deepcopy(raw)  # keeps the order of keys: the first objective is the one that ranks trials
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set: expected key=value (e.g. budget.num_samples=8), got {item!r}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node, dict):
                break
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {key}: {'.'.join(parents)} is not a mapping")
        node[leaf] = load_yaml(value, f"--set {key}")
        dropped = parents == ["dimensions"] and node[leaf] is None  # searched no more: what is fixed stays
        if len(parents) == 1 and parents[0] in MOVES and not dropped:
            for settings in [raw.get(MOVES[parents[0]]), *(raw.get("variants") or {}).values()]:
                if isinstance(settings, dict):
                    settings.pop(leaf, None)
        if parents == ["fixed"] and node[leaf] is None:  # left out: at its default for every trial
            node.pop(leaf)
    return raw


def read_spec_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as file:
            text = file.read(MAX_BYTES + 1)  # no further: a device or a pipe may never end
    except IsADirectoryError:
        raise SpecError(f"spec: {path} is a folder; give a spec file (.yaml) or a preset name") from None
    except OSError as err:
        raise SpecError(f"spec: cannot read {path}: {err.strerror}") from None
    if not text.strip():
        raise SpecError(f"spec: {path} is empty")
    return load_yaml(text, f"spec: {path}") or {}
