"""What one trial can be configured with, per model family, and the allowed values of each setting.

A search spec's fixed settings and every value its dimensions can take are checked against these
models, so a typo or an impossible combination fails before Ray starts.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sharetune.models import COMPONENT_PATHS
from sharetune.models.fusion import FUSIONS
from sharetune.models.hashes import hash_names
from sharetune.models.spin import DISTRIBUTIONS, MAPPINGS

# Metric names: the same in Ray results, MLflow and reports.
METRICS = (
    "test_accuracy", "train_accuracy", "loss", "unique_params", "virtual_params", "macs",
    "entropy", "share_rate", "diverged", "epoch_seconds",
)


class TrainSettings(BaseModel):
    """The training recipe's knobs (sharetune.training.Recipe)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=2)
    weight_decay: float = Field(0.0, ge=0)
    plateau_epochs: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)


class ArbNetSettings(TrainSettings):
    """The ArbNet paper MLP: a hash per layer over a table per layer."""

    hash: str = "dirichlet"
    alpha: Optional[float] = Field(None, gt=0)
    radius: Optional[int] = Field(None, ge=0)
    sparsity: float = Field(0.0, ge=0, lt=1)
    table_size: Optional[int] = Field(None, ge=1)
    compression: Optional[float] = Field(None, gt=0, le=1)
    hidden: Optional[list[int]] = None  # default: the paper's net for the dataset

    @field_validator("hash")
    @classmethod
    def _known_hash(cls, value: str) -> str:
        if value not in hash_names():
            raise ValueError(f"unknown hash {value!r}; allowed: {', '.join(hash_names())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ArbNetSettings":
        if self.alpha is not None and self.hash != "dirichlet":
            raise ValueError(f"alpha: applies only to hash 'dirichlet', not {self.hash!r}")
        if self.radius is not None and self.hash != "neighborhood":
            raise ValueError(f"radius: applies only to hash 'neighborhood', not {self.hash!r}")
        if self.table_size is not None and self.compression is not None:
            raise ValueError("table_size, compression: give one, not both")
        return self


SPIN_MODELS = tuple(COMPONENT_PATHS)


class SpinSettings(TrainSettings):
    """A SPIN isotropic net (create_model) with a sharing plan, transforms or fusion."""

    model: Literal[SPIN_MODELS] = "convmixer"  # type: ignore[valid-type]
    dim: Optional[int] = Field(None, ge=1)
    depth: Optional[int] = Field(None, ge=1)
    patch_size: Optional[int] = Field(None, ge=1)
    kernel_size: Optional[int] = Field(None, ge=1)
    img_size: Optional[int] = Field(None, ge=1)  # resolution the inputs are resized to
    share_rate: float = Field(1.0, ge=1)  # 1: no sharing
    mapping: Literal[MAPPINGS] = "sequential"  # type: ignore[valid-type]
    distribution: Literal[DISTRIBUTIONS] = "uniform"  # type: ignore[valid-type]
    components: Optional[str] = None  # comma-separated; default: the model's (Table 1: pointwise)
    transform_groups: Optional[int] = Field(None, ge=1)
    fusion: Optional[Literal[FUSIONS]] = None  # type: ignore[valid-type]
    pretrain_epochs: int = Field(0, ge=0)  # fusion: epochs the unshared model trains first
    pretrained: Optional[str] = None  # fusion: an unshared state_dict file instead of pretraining

    @model_validator(mode="after")
    def _consistent(self) -> "SpinSettings":
        allowed = COMPONENT_PATHS[self.model]
        for name in self.component_list() or []:
            if name not in allowed:
                raise ValueError(f"components: unknown component {name!r} for {self.model}; allowed: {', '.join(allowed)}")
        if self.fusion is not None and self.transform_groups is not None:
            raise ValueError("fusion, transform_groups: these do not combine; choose one")
        if self.fusion is not None and self.share_rate == 1:
            raise ValueError("fusion: needs share_rate > 1")
        return self

    def component_list(self) -> list[str] | None:
        return None if self.components is None else [c.strip() for c in self.components.split(",") if c.strip()]


FAMILIES: dict[str, type[TrainSettings]] = {"arbnet": ArbNetSettings, "spin": SpinSettings}
