"""One entry point for every model family: `create_model(name, **kwargs)`, in the spirit of timm's.

`sharing=` applies a SPIN plan to the model's blocks: a dict {rate, mapping, distribution, seed,
components}, N x S notation ("[4x1,1x2,...]"), a list of bank ids, or a SharingPlan.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from sharetune.models.arbnet import ArbLinear, ArbNetMLP
from sharetune.models.isotropic import ConvNeXtIsotropic, convmixer, deit
from sharetune.models.spin import SharingPlan, share

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "arbnet_mlp": ArbNetMLP,
    "convmixer": convmixer,
    "convnext_isotropic": ConvNeXtIsotropic,
    "deit_tiny": lambda **kw: deit("tiny", **kw),
    "deit_small": lambda **kw: deit("small", **kw),
}
# What SPIN shares by default: ConvMixer's pointwise convs (Table 1); whole blocks elsewhere.
DEFAULT_COMPONENTS = {"convmixer": ["pointwise"], "convnext_isotropic": ["block"], "deit_tiny": ["block"], "deit_small": ["block"]}
# Component names -> sub-module paths inside one block.
COMPONENT_PATHS = {
    "convmixer": {"pointwise": "1", "depthwise": "0.fn.0", "depthwise_bn": "0.fn.2", "pointwise_bn": "3"},
    "convnext_isotropic": {"block": "", "depthwise": "conv_dw", "mlp": "mlp", "norm": "norm"},
    "deit_tiny": {"block": "", "attn": "attn", "mlp": "mlp"},
    "deit_small": {"block": "", "attn": "attn", "mlp": "mlp"},
}


def model_names() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, sharing: dict | str | list | SharingPlan | None = None, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"model: unknown model {name!r}; allowed: {', '.join(model_names())}")
    model = _MODELS[name](**kwargs)
    if sharing is None:
        return model
    if name not in COMPONENT_PATHS:
        raise ValueError(f"sharing: {name} has no repeated blocks to share; SPIN models: {', '.join(COMPONENT_PATHS)}")
    components = DEFAULT_COMPONENTS[name]
    plan = sharing
    if isinstance(sharing, dict):
        plan = dict(sharing)
        components = plan.pop("components", components)
        plan = plan.pop("plan", plan) if "plan" in plan else plan
    paths = COMPONENT_PATHS[name]
    unknown = [c for c in components if c not in paths]
    if unknown:
        raise ValueError(f"components: unknown component {unknown[0]!r} for {name}; allowed: {', '.join(paths)}")
    return share(model, plan, [paths[c] for c in components])


__all__ = ["ArbLinear", "ArbNetMLP", "SharingPlan", "create_model", "model_names", "share"]
