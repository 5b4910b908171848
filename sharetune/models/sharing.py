"""SPIN's `sharing=` options applied to a built model: the plan (topology, N x S notation, bank ids,
or CKA similarity), the shared components, lightweight transforms (Table 2) and fusion (Table 3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sharetune.analysis import cka_matrix
from sharetune.analysis.cka import MIN_HSIC_SAMPLES
from sharetune.models.fusion import FUSABLE, add_transforms, fuse
from sharetune.models.registry import ModelEntry, shareable_model_names
from sharetune.models.spin import SIMILARITY_MAPPINGS, SharingPlan, cka_plan, names_a_parameter, share, submodule

Sharing = dict | str | list | SharingPlan
CKA_BATCH = 64  # inputs per minibatch of the cka mapping's HSIC


def apply_sharing(
    model: nn.Module, entry: ModelEntry, sharing: Sharing, *, pretrained: bool, cka_data: torch.Tensor | None = None
) -> nn.Module:
    """Share `model`'s blocks as `sharing` says; `pretrained`: the model holds pretrained weights
    (fusion and the CKA mapping start from them)."""
    if not entry.shareable:
        raise ValueError(f"sharing: {entry.name} has no repeated blocks to share; SPIN models: "
                         f"{', '.join(shareable_model_names())}")
    options = dict(sharing) if isinstance(sharing, dict) else {"plan": sharing}
    components = options.pop("components", entry.default_components)
    groups = options.pop("transform_groups", None)
    strategy = options.pop("fusion", None)
    plan = options.pop("plan", options)
    if isinstance(plan, dict) and plan.get("mapping") in SIMILARITY_MAPPINGS:
        plan = _similarity_plan(model, plan, pretrained, cka_data)
    entry.check_components(components)
    targets = [path for c in components for path in entry.components[c]]
    if strategy is not None:
        if not pretrained:
            raise ValueError("fusion: needs pretrained= weights of the unshared model")
        block = model.blocks[0]
        layers = [layer for c in components for layer in _fused_layers(block, entry, c)]
        return fuse(model, plan, layers, strategy)
    model = share(model, plan, targets)
    if groups is None:
        return model
    weights = [t for t in targets if t.endswith("weight")]
    if not weights:
        have = _weight_components(entry)
        raise ValueError(f"transform_groups: transforms act on shared weights, not whole modules ({', '.join(components)}); "
                         + (f"{entry.name}'s weight components: {', '.join(have)}" if have else f"{entry.name} has none"))
    return add_transforms(model, weights, groups)


def _weight_components(entry: ModelEntry) -> list[str]:
    return [c for c, paths in entry.components.items() if any(p.endswith("weight") for p in paths)]


def _similarity_plan(model: nn.Module, options: dict, pretrained: bool, data: torch.Tensor | None) -> SharingPlan:
    if not pretrained or data is None:
        raise ValueError("mapping: 'cka' needs pretrained= weights and cka_data= inputs to compare layers on")
    unknown = sorted(set(options) - {"mapping", "share_rate"})
    if unknown:
        raise ValueError(f"sharing: {unknown[0]!r} does not apply to the cka mapping; it takes: share_rate")
    if "share_rate" not in options:
        raise ValueError("sharing: the cka mapping needs share_rate (layers per bank entry)")
    if len(data) < MIN_HSIC_SAMPLES:
        raise ValueError(f"cka_data: the cka mapping compares layers on {MIN_HSIC_SAMPLES} inputs or more, got {len(data)}")
    batches = torch.tensor_split(data, math.ceil(len(data) / CKA_BATCH))  # even sizes: no short tail batch
    return cka_plan(cka_matrix(model, batches), options["share_rate"])


def _fused_layers(block: nn.Module, entry: ModelEntry, component: str) -> list[str]:
    """The layers (paths in a block) that fusing `component` fuses: a shared weight's layer, whose bias
    is averaged as SPIN's fusion does, or every layer holding parameters inside a shared module."""
    layers, problem = _layers_to_fuse(block, entry.components[component])
    if problem:
        fusable = [c for c in entry.components if not _layers_to_fuse(block, entry.components[c])[1]]
        raise ValueError(f"components: fusion fuses whole {', '.join(t.__name__ for t in FUSABLE)} layers, and "
                         f"{component!r} {problem}; {entry.name}'s components that fuse: {', '.join(fusable)}")
    return layers


def _layers_to_fuse(block: nn.Module, paths: tuple[str, ...]) -> tuple[list[str], str | None]:
    """(layer paths, None), or ([], why these paths cannot be fused)."""
    layers = []
    for path in paths:
        if names_a_parameter(block, path):
            parent, _, leaf = path.rpartition(".")
            if leaf != "weight":
                return [], f"shares only their {leaf}"
            layers.append(parent)
            continue
        for name, module in submodule(block, path).named_modules(prefix=path):
            if next(module.parameters(recurse=False), None) is None:
                continue
            if not isinstance(module, FUSABLE):
                return [], f"holds a {type(module).__name__} ({name or 'the block itself'})"
            layers.append(name)
    return layers, None
