"""One entry point for every model family: `create_model(name, **kwargs)`, in the spirit of timm's.

`create_model` looks the name up in the registry (each model registers next to its builder) and
calls the builder; `sharing=` then applies a SPIN plan to the model's blocks (sharetune.models.sharing):
a dict {share_rate, mapping, distribution, seed, components, transform_groups, fusion}, N x S notation
("[4x1,1x2,...]"), a list of bank ids, or a SharingPlan.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sharetune.models import isotropic  # noqa: F401  (importing it registers the SPIN models)
from sharetune.models.arbnet import PAPER_MLPS, ArbLinear, ArbNetMLP, table_sizes
from sharetune.models.fusion import FUSIONS, add_transforms, deployed, fold, fuse
from sharetune.models.registry import ModelEntry, get_model, model_names, register_model, shareable_model_names
from sharetune.models.sharing import Sharing, apply_sharing
from sharetune.models.spin import (
    ALL_MAPPINGS,
    DEFAULT_DISTRIBUTION,
    DEFAULT_MAPPING,
    DISTRIBUTIONS,
    MAPPINGS,
    SharingPlan,
    cka_plan,
    share,
)
from sharetune.models.weights import WeightsError, load_state_dict


def create_model(
    name: str,
    *,
    sharing: Sharing | None = None,
    pretrained: str | Path | dict | None = None,
    cka_data: torch.Tensor | None = None,
    **kwargs,
) -> nn.Module:
    """Build `name`; `pretrained` is an unshared state_dict (or its file) loaded before sharing.

    `sharing` as a dict takes the plan keys (share_rate, mapping, distribution, seed, or `plan` for N x S
    notation or bank ids) plus `components`, `transform_groups` (Table 2) and `fusion` (Table 3,
    needs `pretrained`). `mapping="cka"` groups contiguous layers whose outputs on `cka_data` are
    most alike in the pretrained model.
    """
    entry = get_model(name)
    entry.check_options(kwargs)
    model = entry.builder(**kwargs)
    if pretrained is not None:
        model.load_state_dict(pretrained if isinstance(pretrained, dict) else load_state_dict(pretrained))
    if sharing is None:
        return model
    return apply_sharing(model, entry, sharing, pretrained=pretrained is not None, cka_data=cka_data)


__all__ = [
    "ALL_MAPPINGS", "DEFAULT_DISTRIBUTION", "DEFAULT_MAPPING", "DISTRIBUTIONS", "FUSIONS", "MAPPINGS", "PAPER_MLPS", "ArbLinear", "ArbNetMLP", "ModelEntry", "SharingPlan",
    "WeightsError", "add_transforms", "cka_plan", "create_model", "deployed", "fold", "fuse", "get_model", "load_state_dict",
    "model_names",
    "register_model", "shareable_model_names", "share", "table_sizes",
]
