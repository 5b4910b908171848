"""SPIN weight fusion (Table 3) and lightweight dynamic transforms (Table 2).

Both replace the module a bank entry holds by one that computes its weight from parameters:
`FusedLayer` from the pretrained weights V_j of the layers it replaces (which stay trainable),
`TransformedLayer` from a shared weight through a per-layer grouped pointwise map. `fold` turns a
fused model into a plain shared one with equal outputs, for inference.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharetune.models.spin import ALIASED, Alias, SharingPlan, WeightBank, replace_submodule, share, submodule

FUSIONS = ("choose_first", "mean", "scalar_weighted_mean", "channel_weighted_mean", "pointwise_conv")


def _apply(template: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(template, nn.Conv2d):
        return template._conv_forward(x, weight, bias)
    if isinstance(template, nn.Linear):
        return F.linear(x, weight, bias)
    raise TypeError(f"components: fusion and transforms work on Conv2d and Linear layers, not {type(template).__name__}")


def _layout(module: nn.Module) -> nn.Module:
    """The layer's hyper-parameters (stride, padding, groups) without its tensors."""
    shell = copy.copy(module)
    shell._parameters = {}
    return shell


class FusedLayer(nn.Module):
    """W = F(V_1..V_S) for one bank entry; biases are averaged (the paper's choice)."""

    def __init__(self, layers: Sequence[nn.Module], strategy: str) -> None:
        super().__init__()
        if strategy not in FUSIONS:
            raise ValueError(f"fusion: unknown strategy {strategy!r}; allowed: {', '.join(FUSIONS)}")
        self.strategy = strategy
        self.__dict__["template"] = _layout(layers[0])
        self.sources = nn.ParameterList([nn.Parameter(m.weight.detach().clone()) for m in layers])
        self.source_biases = nn.ParameterList(
            [nn.Parameter(m.bias.detach().clone()) for m in layers] if layers[0].bias is not None else []
        )
        out_channels, count = layers[0].weight.shape[0], len(layers)
        if strategy == "scalar_weighted_mean":
            self.alpha = nn.Parameter(torch.ones(count))
        elif strategy == "channel_weighted_mean":
            self.alpha = nn.Parameter(torch.ones(count, out_channels))
        elif strategy == "pointwise_conv":
            self.mix = nn.Parameter(torch.eye(out_channels))

    def fused_weight(self) -> Tensor:
        stacked = torch.stack(list(self.sources))  # S x C x ...
        if self.strategy == "choose_first":
            return stacked[0]
        if self.strategy == "mean":
            return stacked.mean(0)
        if self.strategy == "scalar_weighted_mean":
            return (self.alpha.view(-1, *[1] * (stacked.dim() - 1)) * stacked).mean(0)
        if self.strategy == "channel_weighted_mean":
            return (self.alpha.view(*self.alpha.shape, *[1] * (stacked.dim() - 2)) * stacked).mean(0)
        flat = stacked.flatten(2)  # pointwise_conv: the same C x C map applied to every V_k
        return torch.einsum("oc,scf->sof", self.mix, flat).mean(0).view_as(stacked[0])

    def fused_bias(self) -> Tensor | None:
        if not len(self.source_biases):
            return None
        if self.strategy == "choose_first":
            return self.source_biases[0]
        return torch.stack(list(self.source_biases)).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        return _apply(self.template, x, self.fused_weight(), self.fused_bias())

    def virtual_parameter_count(self) -> int:
        """Counted as the one dense layer it stands for."""
        return self.sources[0].numel() + (self.source_biases[0].numel() if len(self.source_biases) else 0)

    def folded(self) -> nn.Module:
        layer = copy.deepcopy(self.template)
        with torch.no_grad():
            layer.weight = nn.Parameter(self.fused_weight().detach().clone())
            bias = self.fused_bias()
            layer.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return layer


class TransformedLayer(nn.Module):
    """W_i = a_i * W_s + b_i: a grouped pointwise map over the output channels of a shared weight.

    `group_size` G input channels per group (G = 1: a per-channel scale; G = C: a full C x C map),
    which matches SPIN Table 2's parameter counts. Starts as the identity, i.e. plain sharing.
    """

    def __init__(self, layer: nn.Module, group_size: int) -> None:
        super().__init__()
        channels = layer.weight.shape[0]
        if group_size < 1 or channels % group_size:
            raise ValueError(f"transform_groups: must divide the {channels} channels, got {group_size}")
        self.layer = layer  # its weight is a bank alias; its bias (if not shared) stays its own
        self.group_size = group_size
        groups = channels // group_size
        self.scale = nn.Parameter(torch.eye(group_size).repeat(groups, 1, 1))  # groups x G x G
        self.shift = nn.Parameter(torch.zeros(channels))

    def weight(self) -> Tensor:
        w = self.layer.weight
        grouped = w.reshape(self.scale.shape[0], self.group_size, -1)
        mixed = torch.bmm(self.scale, grouped).reshape_as(w)
        return mixed + self.shift.view(-1, *[1] * (w.dim() - 1))

    def forward(self, x: Tensor) -> Tensor:
        return _apply(self.layer, x, self.weight(), self.layer.bias)


def fuse(pretrained: nn.Module, plan: SharingPlan | str | Sequence[int] | dict, components: Sequence[str], strategy: str, *, blocks: str = "blocks") -> nn.Module:
    """A shared copy of `pretrained` whose bank entries fuse the pretrained layers they replace."""
    model = copy.deepcopy(pretrained)
    return share(model, plan, components, blocks=blocks, make_entry=lambda layers: FusedLayer(layers, strategy))


def add_transforms(model: nn.Module, weights: Sequence[str], group_size: int, *, blocks: str = "blocks") -> nn.Module:
    """Give every layer after the first user of a shared weight ("1.weight") its own transform."""
    layers = submodule(model, blocks)
    seen: set[int] = set()
    for i in range(len(layers)):
        for weight in weights:
            path = f"{i}.{weight.rpartition('.')[0]}"
            layer = submodule(layers, path)
            if "weight" not in layer.__dict__.get(ALIASED, ()):
                raise ValueError(f"components: {weight!r} is not shared; share it before adding transforms")
            if id(layer.weight) in seen:
                replace_submodule(layers, path, TransformedLayer(layer, group_size))
            seen.add(id(layer.weight))
    return model


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Constant-fold every FusedLayer into a plain layer: a shared model with the same outputs.
    Works on wrapped models too (every weight bank inside `model` is folded)."""
    model = copy.deepcopy(model)
    folded = {}
    for bank in [m for m in model.modules() if isinstance(m, WeightBank)]:
        for name, module in list(bank.named_children()):
            if isinstance(module, FusedLayer):
                folded[id(module)] = module.folded()
                setattr(bank, name, folded[id(module)])
    for module in model.modules():
        if isinstance(module, Alias) and id(module.target) in folded:
            module.__dict__["target"] = folded[id(module.target)]
    return model


def deployed(model: nn.Module) -> nn.Module:
    """The model as it ships: fused layers folded to one weight each (SPIN Table 3 counts these)."""
    return fold(model) if any(isinstance(m, FusedLayer) for m in model.modules()) else model
