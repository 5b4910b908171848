"""The model registry: each family registers next to its builder, with what SPIN needs to share it.

`create_model` only looks a name up here and calls its builder; what a model can share (its
components, as paths inside one block) and shares by default travel with its entry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    # SPIN: component name -> paths inside one block of `model.blocks`: sub-modules ("attn", "" for the
    # whole block) or single parameters ("1.weight"). Empty: the model has no repeated blocks.
    components: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_components: tuple[str, ...] = ()

    @property
    def shareable(self) -> bool:
        return bool(self.components)

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the builder names (architecture settings it understands)."""
        params = inspect.signature(self.builder).parameters.values()
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    def default(self, option: str):
        """The builder's default for `option`; None where it names none."""
        parameter = inspect.signature(self.builder).parameters.get(option)
        return None if parameter is None or parameter.default is parameter.empty else parameter.default

    def check_options(self, options: dict) -> None:
        """One clear error for an option the builder does not name (and passes to no **kwargs)."""
        params = inspect.signature(self.builder).parameters.values()
        unknown = [k for k in options if k not in self.options]
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
            raise ValueError(f"{unknown[0]}: not an option of {self.name}; it takes: {', '.join(self.options)}")

    def check_components(self, names: list[str]) -> None:
        """One clear error for a component this model cannot share."""
        unknown = [c for c in names if c not in self.components]
        if unknown:
            raise ValueError(f"components: unknown component {unknown[0]!r} for {self.name}; allowed: {', '.join(self.components)}")


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, components: Mapping[str, tuple[str, ...]] | None = None, default_components: tuple[str, ...] = ()
) -> Callable[[Builder], Builder]:
    """Register `builder(**options) -> nn.Module` under `name`."""

    def wrap(builder: Builder) -> Builder:
        _MODELS[name] = ModelEntry(name, builder, dict(components or {}), default_components)
        return builder

    return wrap


def model_names() -> list[str]:
    return sorted(_MODELS)


def shareable_model_names() -> list[str]:
    """The isotropic models SPIN shares across layers."""
    return [name for name in model_names() if _MODELS[name].shareable]


def get_model(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"model: unknown model {name!r}; allowed: {', '.join(model_names())}") from None
