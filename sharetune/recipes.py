"""Training recipes: the ArbNet paper's and SPIN's, on timm's pieces.

`arbnet` (ArbNet section 4.3): SGD with momentum 0.9 at lr 0.1; the rate drops 10x once training
accuracy has not improved for four epochs. `spin` (SPIN appendix C, ConvMixer's recipe): AdamW at
lr 0.01 for 640 images a step (64 per GPU on 10 GPUs; scaled linearly with the batch), weight decay 2e-5 except on norms and
biases, one cosine cycle with its warm-up (one-cycle), label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, MixUp 0.8 / CutMix 1.0, random erasing 0.25, gradients clipped at norm 5.
Every piece is a setting of its own; one left out comes from the chosen bundle.

`Recipe` owns the training settings and their defaults; every model family's trial settings extend
it (sharetune.spaces.settings), so a trial's settings are its recipe, and sharetune.training trains by it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sharetune.data import Augment

# The validation context of what a search has already accepted (its saved spec, its trials' configs):
# the refusals a new spec gets are not applied again, so a folder an earlier version wrote stays
# readable and resumable however the checks grow.
ACCEPTED = {"accepted": True}
SCHEDULES = ("plateau", "cosine", "onecycle")
MAX_SEED = 2**32 - 1  # the largest seed every generator takes (numpy's legacy one, Optuna's samplers)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
PRECISIONS = ("fp32", "bf16", "fp16")
# The bundles a `recipe` names. 0 (or "none") turns a piece off; lr_batch 0: lr is used as given.
RECIPES: dict[str, dict] = {
    "arbnet": {
        "optimizer": "momentum", "lr": 0.1, "lr_batch": 0, "momentum": 0.9, "weight_decay": 0.0, "schedule": "plateau",
        "warmup_epochs": 0, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "randaugment": "none",
        "random_erasing": 0.0, "grad_clip": 0.0, "ema_decay": 0.0,
    },
    "spin": {
        "optimizer": "adamw", "lr": 0.01, "lr_batch": 640, "momentum": 0.9, "weight_decay": 2e-5, "schedule": "onecycle",
        "warmup_epochs": 0, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "randaugment": "rand-m9-mstd0.5-inc1",
        "random_erasing": 0.25, "grad_clip": 5.0, "ema_decay": 0.0,
    },
}


class Recipe(BaseModel):
    """The training settings, validated (bad values fail with the field's name). A piece left None
    takes the `recipe` bundle's value when the settings are parsed."""

    model_config = ConfigDict(extra="forbid")

    recipe: Literal[tuple(RECIPES)] = "arbnet"  # type: ignore[valid-type]
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=2)
    seed: Seed = 0
    plateau_epochs: int = Field(4, ge=1)  # plateau schedule: epochs without a better train accuracy before lr /= 10
    optimizer: Optional[str] = None  # timm's names: momentum (SGD), sgd (Nesterov), adamw, lamb, ...
    lr: Optional[float] = Field(None, gt=0)
    lr_batch: Optional[int] = Field(None, ge=0)  # the batch `lr` is given for; the rate scales linearly from it
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    weight_decay: Optional[float] = Field(None, ge=0)
    schedule: Optional[Literal[SCHEDULES]] = None  # type: ignore[valid-type]
    warmup_epochs: Optional[int] = Field(None, ge=0)  # cosine: epochs of linear warm-up
    label_smoothing: Optional[float] = Field(None, ge=0, lt=1)
    mixup: Optional[float] = Field(None, ge=0)  # MixUp's beta alpha
    cutmix: Optional[float] = Field(None, ge=0)  # CutMix's beta alpha
    randaugment: Optional[str] = None  # timm's RandAugment config, or "none"
    random_erasing: Optional[float] = Field(None, ge=0, le=1)
    grad_clip: Optional[float] = Field(None, ge=0)  # max gradient norm
    ema_decay: Optional[float] = Field(None, ge=0, lt=1)  # model EMA (sharetune.ema, on timm's); evaluation uses it
    precision: Optional[Literal[PRECISIONS]] = None  # type: ignore[valid-type]  # None: bf16 on a CUDA device that has it, else fp32
    channels_last: Optional[bool] = None  # None: on for convolutional models on CUDA
    compile: bool = False  # torch.compile the model (falls back to eager, with one warning, if it fails)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or accepted(info):  # an accepted one was checked (timm's list costs an import of timm)
            return value
        from timm.optim import list_optimizers

        if value not in list_optimizers():
            raise ValueError(f"unknown optimizer {value!r}; allowed: timm's, e.g. momentum, sgd, adamw, lamb")
        return value

    @field_validator("randaugment")
    @classmethod
    def _known_randaugment(cls, value: str | None) -> str | None:
        if value not in (None, "none"):
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(value, {})
            except (AssertionError, ValueError, KeyError, IndexError) as err:
                raise ValueError(f"not a RandAugment config like rand-m9-mstd0.5-inc1 ({err})") from None
        return value

    @classmethod
    def conditions(cls) -> dict[str, dict[str, Sequence]]:
        """Settings that apply only for some values of another: {setting: {other: [values]}}. The
        search space samples them only there, and a run refuses one it would ignore."""
        return {"warmup_epochs": {"schedule": ["cosine"]}, "plateau_epochs": {"schedule": ["plateau"]},
                "momentum": {"optimizer": MOMENTUM_OPTIMIZERS}}

    @model_validator(mode="after")
    def _from_bundle(self, info: ValidationInfo) -> "Recipe":
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs: {self.warmup_epochs} leaves no epoch after the warm-up of {self.epochs}")
        if not accepted(info):
            self._refuse_ignored()
        return self

    def _refuse_ignored(self) -> None:
        """ValueError for a setting the run would ignore (`conditions`), unless it holds the value the
        run has anyway."""
        for name, condition in self.conditions().items():
            for other, allowed in condition.items():
                unused = RECIPES[self.recipe].get(name, type(self).model_fields[name].default)
                if getattr(self, name) != unused and getattr(self, other) not in allowed:  # reads `allowed` only if set
                    shown = " or ".join(map(repr, allowed[:4])) + (f" (or {len(allowed) - 4} more)" if len(allowed) > 4 else "")
                    raise ValueError(f"{name}: applies only to {other} {shown}, not {getattr(self, other)!r}; leave {name} out")

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_batch if self.lr_batch else self.lr

    @property
    def augment(self) -> Augment:
        return Augment(None if self.randaugment == "none" else self.randaugment, self.random_erasing)


def accepted(info: ValidationInfo) -> bool:
    """Whether the settings being validated were accepted before (ACCEPTED)."""
    return bool(info.context and info.context.get("accepted"))


class _MomentumOptimizers(Sequence[str]):
    """timm's optimizers that take a momentum, the common ones first (error messages show a few), listed
    on first use: listing them imports timm, seconds of a search's start that an ArbNet search whose
    optimizer is neither searched nor given a momentum never needs."""

    @functools.cached_property
    def _names(self) -> list[str]:
        from timm.optim import get_optimizer_info, list_optimizers

        common = ("momentum", "sgd", "nesterov", "rmsprop")
        return sorted((n for n in list_optimizers() if get_optimizer_info(n).has_momentum), key=lambda n: (n not in common, n))

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:  # error messages show the list
        return repr(self._names)


MOMENTUM_OPTIMIZERS = _MomentumOptimizers()
