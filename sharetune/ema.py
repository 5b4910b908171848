"""A model EMA (timm's ModelEmaV3) that averages the model's floating-point tensors only.

timm's update walks `state_dict()`: it fails on a layer's non-tensor extra state (an ArbNet layer keeps
its hash recipe there), and it copies every integer buffer at every step (an ArbNet layer's index, as
large as the dense weights), though none ever changes. Imported where a recipe keeps an EMA.
"""

from __future__ import annotations

import itertools

import torch
from timm.utils import ModelEmaV3
from torch import nn


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]


class ModelEma(ModelEmaV3):
    """ModelEmaV3 (its decay, warm-up and `module`), updating the floating-point parameters and buffers."""

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        torch._foreach_lerp_(_tensors(self.module), _tensors(model), weight=1.0 - decay)
