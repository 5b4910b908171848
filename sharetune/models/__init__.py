"""One entry point for every model family: `create_model(name, **kwargs)`, in the spirit of timm's.

`sharing=` applies a SPIN plan to the model's blocks: a dict {rate, mapping, distribution, seed,
components}, N x S notation ("[4x1,1x2,...]"), a list of bank ids, or a SharingPlan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sharetune.models.arbnet import ArbLinear, ArbNetMLP
from sharetune.models.isotropic import ConvNeXtIsotropic, convmixer, deit
from sharetune.models.fusion import add_transforms, fold, fuse
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
# Component names -> paths inside one block: sub-modules, or single parameters (SPIN Table 9 shares
# ConvMixer's pointwise and depthwise weights, the conv biases and the BatchNorms separately).
COMPONENT_PATHS = {
    "convmixer": {
        "pointwise": ["1.weight"], "depthwise": ["0.fn.0.weight"], "bias": ["1.bias", "0.fn.0.bias"],
        "batchnorm": ["0.fn.2", "3"], "pointwise_conv": ["1"], "depthwise_conv": ["0.fn.0"],
    },
    "convnext_isotropic": {"block": [""], "depthwise": ["conv_dw"], "mlp": ["mlp"], "norm": ["norm"]},
    "deit_tiny": {"block": [""], "attn": ["attn"], "mlp": ["mlp"]},
    "deit_small": {"block": [""], "attn": ["attn"], "mlp": ["mlp"]},
}


def model_names() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    sharing: dict | str | list | SharingPlan | None = None,
    pretrained: str | Path | dict | None = None,
    cka_data: torch.Tensor | None = None,
    **kwargs,
) -> nn.Module:
    """Build `name`; `pretrained` is an unshared state_dict (or its file) loaded before sharing.

    `sharing` as a dict takes the plan keys (rate, mapping, distribution, seed, or `plan` for N x S
    notation or bank ids) plus `components`, `transform_groups` (Table 2) and `fusion` (Table 3,
    needs `pretrained`). `mapping="cka"` groups contiguous layers whose outputs on `cka_data` are
    most alike in the pretrained model (beyond the paper, which only suggests CKA as a guide).
    """
    if name not in _MODELS:
        raise ValueError(f"model: unknown model {name!r}; allowed: {', '.join(model_names())}")
    model = _MODELS[name](**kwargs)
    if pretrained is not None:
        state = pretrained if isinstance(pretrained, dict) else torch.load(pretrained, map_location="cpu")
        model.load_state_dict(state)
    if sharing is None:
        return model
    if name not in COMPONENT_PATHS:
        raise ValueError(f"sharing: {name} has no repeated blocks to share; SPIN models: {', '.join(COMPONENT_PATHS)}")
    options = dict(sharing) if isinstance(sharing, dict) else {"plan": sharing}
    components = options.pop("components", DEFAULT_COMPONENTS[name])
    groups = options.pop("transform_groups", None)
    strategy = options.pop("fusion", None)
    plan = options.pop("plan", options)
    if isinstance(plan, dict) and plan.get("mapping") == "cka":
        plan = _cka_plan(model, plan, pretrained is not None, cka_data)
    paths = COMPONENT_PATHS[name]
    unknown = [c for c in components if c not in paths]
    if unknown:
        raise ValueError(f"components: unknown component {unknown[0]!r} for {name}; allowed: {', '.join(paths)}")
    targets = [path for c in components for path in paths[c]]
    if strategy is not None:
        if pretrained is None:
            raise ValueError("fusion: needs pretrained= weights of the unshared model")
        return fuse(model, plan, [_layer_path(t) for t in targets], strategy)  # fuses whole layers
    model = share(model, plan, targets)
    return model if groups is None else add_transforms(model, [t for t in targets if t.endswith("weight")], groups)


def _cka_plan(model: nn.Module, options: dict, has_pretrained: bool, data: torch.Tensor | None) -> SharingPlan:
    from sharetune.analysis import cka_matrix, cka_plan

    if not has_pretrained or data is None:
        raise ValueError("mapping: 'cka' needs pretrained= weights and cka_data= inputs to compare layers on")
    unknown = sorted(set(options) - {"mapping", "rate"})
    if unknown:
        raise ValueError(f"sharing: {unknown[0]!r} does not apply to the cka mapping; it takes: rate")
    batches = list(torch.split(data, 64))
    return cka_plan(cka_matrix(model, batches), options.get("rate", 2))


def _layer_path(path: str) -> str:
    """The layer a parameter path belongs to ("1.weight" -> "1"); module paths stay as they are."""
    parent, _, leaf = path.rpartition(".")
    return parent if leaf in ("weight", "bias") else path


__all__ = ["ArbLinear", "ArbNetMLP", "SharingPlan", "add_transforms", "create_model", "fold", "fuse", "model_names", "share"]
