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

from sharetune.metrics.counts import ALIASED, count_params
from sharetune.models.spin import Alias, SharingPlan, WeightBank, replace_submodule, share, submodule

FUSIONS = ("choose_first", "mean", "scalar_weighted_mean", "channel_weighted_mean", "pointwise_conv")
FUSABLE = (nn.Conv2d, nn.Linear, nn.LayerNorm)  # the layers a fused component may hold


def _apply(template: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(template, nn.Conv2d):
        return template._conv_forward(x, weight, bias)
    if isinstance(template, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(template, nn.LayerNorm):
        return F.layer_norm(x, template.normalized_shape, weight, bias, template.eps)
    raise TypeError(f"components: fusion and transforms work on {', '.join(t.__name__ for t in FUSABLE)} layers, "
                    f"not {type(template).__name__}")


def _layout(module: nn.Module) -> nn.Module:
    """The layer's hyper-parameters (stride, padding, groups) without its tensors."""
    shell = copy.copy(module)
    shell._parameters = {}
    return shell


class FusedLayer(nn.Module):
    """W = F(V_1..V_S) for one bank entry; biases are averaged (the paper's choice), and so are a
    LayerNorm's scales, which like biases have no channels to mix.

    `choose_first` keeps V_1 alone: the other layers' weights would be parameters no step reads,
    which DDP refuses (and which would only cost memory)."""

    def __init__(self, layers: Sequence[nn.Module], strategy: str) -> None:
        super().__init__()
        if strategy not in FUSIONS:
            raise ValueError(f"fusion: unknown strategy {strategy!r}; allowed: {', '.join(FUSIONS)}")
        self.mixes_channels = isinstance(layers[0], (nn.Conv2d, nn.Linear))  # else a norm layer's scales
        self.strategy = strategy if self.mixes_channels or strategy == "choose_first" else "mean"
        self.__dict__["template"] = _layout(layers[0])
        layers = layers[:1] if strategy == "choose_first" else layers
        self.sources = nn.ParameterList([nn.Parameter(m.weight.detach().clone()) for m in layers])
        self.source_biases = nn.ParameterList(
            [nn.Parameter(m.bias.detach().clone()) for m in layers] if layers[0].bias is not None else []
        )
        out_channels, count = layers[0].weight.shape[0], len(layers)
        if self.strategy == "scalar_weighted_mean":
            self.alpha = nn.Parameter(torch.ones(count))
        elif self.strategy == "channel_weighted_mean":
            self.alpha = nn.Parameter(torch.ones(count, out_channels))
        elif self.strategy == "pointwise_conv":
            self.mix = nn.Parameter(torch.eye(out_channels))

    def no_weight_decay(self) -> set[str]:
        """What the recipe leaves undecayed here, as timm's models declare it: the biases, and a norm
        layer's scales."""
        return {"source_biases.*"} if self.mixes_channels else {"source_biases.*", "sources.*"}

    def mixing(self) -> Tensor | None:
        """The strategy's own parameter: alpha (per source, or per source and channel) or the C x C map."""
        return self.mix if self.strategy == "pointwise_conv" else getattr(self, "alpha", None)

    def fused_weight(self) -> Tensor:
        if self.strategy == "choose_first":
            return self.sources[0]
        mixing = self.mixing()
        return fuse_weights(self.strategy, torch.stack(list(self.sources))[None], None if mixing is None else mixing[None])[0]

    def fused_bias(self) -> Tensor | None:
        if not len(self.source_biases):
            return None
        if self.strategy == "choose_first":
            return self.source_biases[0]
        return torch.stack(list(self.source_biases)).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        # Within a model's forward, `FusionBatch` has computed the weight already, for every layer
        # this entry stands for (S of them) and every other entry at once.
        weight, bias = self.__dict__.get("fused") or (self.fused_weight(), self.fused_bias())
        return _apply(self.template, x, weight, bias)

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


def fuse_weights(strategy: str, sources: Tensor, mixing: Tensor | None) -> Tensor:
    """W = F(V_1..V_S) for E bank entries at once: `sources` is E x S x C x ..., `mixing` each entry's
    parameter of the strategy (E x S, E x S x C or E x C x C; None for mean)."""
    if strategy == "mean":
        return sources.mean(1)
    if strategy in ("scalar_weighted_mean", "channel_weighted_mean"):
        return (mixing.view(*mixing.shape, *[1] * (sources.dim() - mixing.dim())) * sources).mean(1)
    mean = sources.mean(1)  # pointwise_conv: the same C x C map applied to every V_k is applied to their mean
    return torch.bmm(mixing, mean.flatten(2)).view_as(mean)


class FusionBatch:
    """Computes every fused bank entry's weight once per forward of the model, in one batched operation
    per kind of entry (strategy, sources, shape), instead of once per layer that reads it.

    Fusion in training otherwise recomputes an entry's weight for each of the S layers sharing it, a
    stack, a product and a mean each time: dozens of small kernels per step, which on a GPU cost more
    than the model's own (1.37x an unshared ConvMixer's step on an H100). Registered as forward hooks
    on the fused model; the weights live from the hook before its forward to the one after, so every
    forward (training, evaluation, an EMA copy's) computes its own, under its own autograd mode.
    """

    def __init__(self, bank: nn.Module) -> None:
        self.bank = bank  # folding replaces its FusedLayers; then there is nothing to batch

    def groups(self) -> list[list[FusedLayer]]:
        kinds: dict[tuple, list[FusedLayer]] = {}
        for layer in self.bank.children():
            if isinstance(layer, FusedLayer) and layer.strategy != "choose_first":  # that one computes nothing
                key = (layer.strategy, len(layer.sources), layer.sources[0].shape, len(layer.source_biases))
                kinds.setdefault(key, []).append(layer)
        return list(kinds.values())

    def before(self, module: nn.Module, args) -> None:
        for group in self.groups():
            sources = torch.stack([p for layer in group for p in layer.sources]).unflatten(0, (len(group), -1))
            mixing = group[0].mixing()
            mixing = None if mixing is None else torch.stack([layer.mixing() for layer in group])
            weights = fuse_weights(group[0].strategy, sources, mixing)
            biases = [None] * len(group)
            if len(group[0].source_biases):
                biases = torch.stack([b for layer in group for b in layer.source_biases]).unflatten(0, (len(group), -1)).mean(1)
            for layer, weight, bias in zip(group, weights, biases):
                layer.fused = (weight, bias)

    def after(self, module: nn.Module, args, output) -> None:
        for layer in self.bank.children():
            layer.__dict__.pop("fused", None)


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

    def virtual_parameter_count(self) -> int:
        """Counted as the one dense layer it stands for: the transform is part of the sharing's cost."""
        return count_params(self.layer).virtual


def fuse(pretrained: nn.Module, plan: SharingPlan | str | Sequence[int] | dict, components: Sequence[str], strategy: str) -> nn.Module:
    """A shared copy of `pretrained` whose bank entries fuse the pretrained layers they replace."""
    model = copy.deepcopy(pretrained)
    model = share(model, plan, components, make_entry=lambda layers: FusedLayer(layers, strategy))
    batch = FusionBatch(model.spin_bank)
    model.register_forward_pre_hook(batch.before)
    model.register_forward_hook(batch.after, always_call=True)  # an exception must not leave a stale graph
    return model


def add_transforms(model: nn.Module, weights: Sequence[str], group_size: int) -> nn.Module:
    """Give every layer after the first user of a shared weight ("1.weight") its own transform."""
    layers = model.blocks
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
