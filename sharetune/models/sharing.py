"""SPIN's `sharing=` options applied to a built model: the plan (topology, N x S notation, bank ids,
or CKA similarity), the shared components, lightweight transforms (Table 2) and fusion (Table 3)."""

from __future__ import annotations

import torch
from torch import nn

from sharetune.analysis import cka_matrix
from sharetune.models.fusion import add_transforms, fuse
from sharetune.models.registry import ModelEntry, shareable_model_names
from sharetune.models.spin import SIMILARITY_MAPPINGS, SharingPlan, cka_plan, share

Sharing = dict | str | list | SharingPlan


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
        return fuse(model, plan, [_layer_path(t) for t in targets], strategy)  # fuses whole layers
    model = share(model, plan, targets)
    return model if groups is None else add_transforms(model, [t for t in targets if t.endswith("weight")], groups)


def _similarity_plan(model: nn.Module, options: dict, pretrained: bool, data: torch.Tensor | None) -> SharingPlan:
    if not pretrained or data is None:
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
