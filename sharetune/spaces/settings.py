"""What one trial can be configured with, per model family, and the allowed values of each setting.

These models own every default: a search spec's fixed settings and every value its dimensions can
take are checked against them before Ray starts, each trial parses its config into one of them
once, and the CLI's `train` command builds one from its options. Each extends the training
`Recipe`, so a trial's settings are its recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Iterable, Literal, Optional, get_args

from pydantic import ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sharetune.models import (
    ALL_MAPPINGS,
    DEFAULT_DISTRIBUTION,
    DEFAULT_MAPPING,
    DISTRIBUTIONS,
    FUSIONS,
    get_model,
    shareable_model_names,
)
from sharetune.models.hashes import hash_defaults, hash_names, hashes_taking
from sharetune.recipes import ACCEPTED, RECIPES, Recipe, accepted

DEFAULT_TABLE_SIZE = 1000  # entries per ArbNet layer when neither table_size nor compression is given


class FamilySettings(Recipe):
    """A model family's trial settings: the recipe plus the model's own."""

    model_config = ConfigDict(allow_inf_nan=False)  # an infinite share_rate or lr is a mistake, not a setting
    # the costs as its paper counts them, where not in units of one: cost -> (column, units)
    COST_UNITS: ClassVar[dict[str, tuple[str, float]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value, info: ValidationInfo):
        """Pydantic's lax parsing reads `epochs: true` as 1 epoch and `"3"` as 3; a number setting takes numbers."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(get_args(annotation) or (annotation,))
        if isinstance(value, (bool, str)) and kinds & {int, float} and not kinds & {bool, str}:
            raise PydanticCustomError("number", "got {value}; give a number", {"value": repr(value)})
        return value

    @property
    def resolution(self) -> int | None:
        """The image size the model sees, where the trial sets one (None: the data's)."""
        return None

    def needs_pretrained(self) -> bool:
        """Whether the model starts from a pretrained unshared one (SPIN's fusion and cka mapping)."""
        return False


class ArbNetSettings(FamilySettings):
    """The ArbNet paper MLP: a hash per layer over a table per layer."""

    hash: str = "dirichlet"
    alpha: Optional[float] = Field(None, gt=0, le=1e6)  # None: the hash's own, filled in; 1e6 is uniform already, 1e308 overflows
    radius: Optional[int] = Field(None, ge=0)
    sparsity: float = 0.0  # fraction of virtual weights read as zero
    table_size: Optional[int] = Field(None, ge=1)  # default: DEFAULT_TABLE_SIZE, unless compression is given
    compression: Optional[float] = Field(None, gt=0, le=1)
    hidden: Optional[list[PositiveInt]] = Field(None, min_length=1)  # default: the paper's net for the dataset

    @classmethod
    def conditions(cls) -> dict[str, dict[str, Sequence]]:
        """A hash option (alpha, radius) applies only to the hashes that declare it."""
        return {**super().conditions(), **{name: {"hash": hashes_taking(name)} for name in cls.model_fields if hashes_taking(name)}}

    @field_validator("hash")
    @classmethod
    def _known_hash(cls, value: str) -> str:
        if value not in hash_names():
            raise ValueError(f"unknown hash {value!r}; allowed: {', '.join(hash_names())}")
        return value

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise PydanticCustomError("less_than", "must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ArbNetSettings":
        if self.table_size is not None and self.compression is not None:
            raise ValueError("table_size, compression: give one, not both")
        if self.hash == "identity" and (self.table_size is not None or self.compression is not None):
            raise ValueError("table_size, compression: the identity hash keeps one entry per weight; leave them out")
        if self.table_size is None and self.compression is None and self.hash != "identity":
            self.table_size = DEFAULT_TABLE_SIZE
        for option, value in hash_defaults(self.hash).items():  # so runs and reports record what the hash used
            if option in type(self).model_fields and getattr(self, option) is None:
                setattr(self, option, value)
        return self


SPIN_MODELS = tuple(shareable_model_names())


class SpinSettings(FamilySettings):
    """A SPIN isotropic net (create_model) with a sharing plan, transforms or fusion; trained with the
    SPIN paper's recipe unless `recipe` says otherwise."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("dim", "depth", "patch_size", "kernel_size", "img_size")  # model options
    SHARING: ClassVar[tuple[str, ...]] = ("share_rate", "mapping", "distribution", "components", "transform_groups", "fusion")
    COST_UNITS = {"unique_params": ("params_M", 1e6), "macs": ("macs_G", 1e9)}

    recipe: Literal[tuple(RECIPES)] = "spin"  # type: ignore[valid-type]

    model: Literal[SPIN_MODELS] = "convmixer"  # type: ignore[valid-type]
    dim: Optional[int] = Field(None, ge=1)  # None (dim ... img_size): the model's own default
    depth: Optional[int] = Field(None, ge=1)
    patch_size: Optional[int] = Field(None, ge=1)
    kernel_size: Optional[int] = Field(None, ge=1)
    img_size: Optional[int] = Field(None, ge=1)  # resolution the inputs are resized to; default: the data's
    share_rate: float = Field(1.0, ge=1)  # layers per bank entry (SPIN's L/P); 1: no sharing
    mapping: Literal[ALL_MAPPINGS] = DEFAULT_MAPPING  # type: ignore[valid-type]
    distribution: Literal[DISTRIBUTIONS] = DEFAULT_DISTRIBUTION  # type: ignore[valid-type]
    components: Optional[str] = None  # comma-separated; default: the model's (Table 1: pointwise)
    transform_groups: Optional[int] = Field(None, ge=1)  # Table 2's G: channels each layer's transform mixes
    fusion: Optional[Literal[FUSIONS]] = None  # type: ignore[valid-type]
    pretrain_epochs: int = Field(0, ge=0)  # fusion, cka: epochs the unshared model trains first
    pretrained: Optional[str] = None  # fusion, cka: an unshared state_dict file instead of pretraining

    @field_validator("components", mode="before")
    @classmethod
    def _components_listed(cls, value):
        """A YAML list of components reads as the comma-separated text (`[pointwise, depthwise]`)."""
        return ",".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "SpinSettings":
        if self.components is not None and not self.component_list():
            raise ValueError(f"components: none given; allowed: {', '.join(get_model(self.model).components)}")
        get_model(self.model).check_components(self.component_list() or [])
        if self.fusion is not None and self.transform_groups is not None:
            raise ValueError("fusion, transform_groups: these do not combine; choose one")
        if self.fusion is not None and self.share_rate == 1:
            raise ValueError("fusion: needs share_rate > 1")
        if self.mapping == "cka" and self.distribution != "uniform":
            raise ValueError("distribution: the cka mapping groups the whole depth by similarity; use 'uniform'")
        pretrains = self.needs_pretrained() and not self.pretrained and self.pretrain_epochs
        if pretrains and self.schedule == "cosine" and self.warmup_epochs >= self.pretrain_epochs and not accepted(info):
            raise ValueError(f"pretrain_epochs: {self.pretrain_epochs} would end the pretraining inside the warm-up "
                             f"(warmup_epochs: {self.warmup_epochs}); allowed: more than {self.warmup_epochs}")
        return self

    def component_list(self) -> list[str] | None:
        return None if self.components is None else [c.strip() for c in self.components.split(",") if c.strip()]

    @property
    def resolution(self) -> int | None:
        return self.img_size

    def needs_pretrained(self) -> bool:
        return self.share_rate > 1 and (self.fusion is not None or self.mapping == "cka")

    def unused(self, given: Iterable[str]) -> dict[str, str]:
        """Of the settings `given`, those this model never reads, each with where it would apply: a sharing
        plan's without sharing (share_rate 1), pretraining's where no model starts from the unshared one, a
        model option (kernel_size) the model does not take."""
        unused = {name: "where share_rate is above 1" for name in ("mapping", "distribution", "components", "transform_groups")
                  if self.share_rate == 1}
        if not self.needs_pretrained():
            unused.update(dict.fromkeys(("pretrain_epochs", "pretrained"), "where fusion or the cka mapping start from the unshared model"))
        for name in (name for name in self.ARCHITECTURE if name not in get_model(self.model).options):
            unused[name] = f"to the models that take it: {', '.join(m for m in SPIN_MODELS if name in get_model(m).options)}"
        given = set(given)
        return {name: where for name, where in unused.items() if name in given}

    def unshared_model(self) -> tuple:
        """What the unshared network is (not how it trains): pretrained weights fit the trials alike in it."""
        return (self.model, *(getattr(self, name) for name in self.ARCHITECTURE))


FAMILIES: dict[str, type[FamilySettings]] = {"arbnet": ArbNetSettings, "spin": SpinSettings}


def trial_settings(config: dict) -> FamilySettings:
    """A trial's config (Ray/Optuna's: family, fixed and sampled values) as its typed settings."""
    cls = FAMILIES[config["family"]]  # its search's spec was checked: ACCEPTED
    return cls.model_validate({k: v for k, v in config.items() if k in cls.model_fields}, context=ACCEPTED)
