"""Parameter and multiply-add counts in the conventions of the papers.

`count_params` separates stored (unique) parameters from the dense-equivalent (virtual) ones.
`count_macs` follows fvcore, which SPIN used: convolutions, linear layers and matmuls count one MAC
per multiply-add, inference BatchNorm counts one per element (two with an affine), LayerNorm four
(five with an affine), elementwise activations are free. `torch.utils.flop_counter` does the matmul
family; we add what it misses.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from sharetune.metrics.record import ModelCosts

aten = torch.ops.aten


@dataclass(frozen=True)
class ParamCount:
    unique: int  # what is stored and trained: shared tensors counted once
    virtual: int  # what a dense, unshared model of the same shapes would hold


ALIASED = "_spin_aliased"  # per module: names of the parameters it reads from another's storage (a SPIN bank)


def count_params(model: nn.Module) -> ParamCount:
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    return ParamCount(unique=unique, virtual=_virtual(model))


def _virtual(module: nn.Module) -> int:
    """Modules that know their dense equivalent (ArbLinear, SPIN aliases) answer for their subtree;
    a module placed at two positions is counted at both."""
    counter = getattr(module, "virtual_parameter_count", None)
    if counter is not None:
        return counter()
    own = sum(p.numel() for p in module.parameters(recurse=False))
    own += sum(getattr(module, name).numel() for name in module.__dict__.get(ALIASED, ()))  # bank tensors it reads
    children = [m for m in module._modules.values() if m is not None]  # children() drops repeats
    return own + sum(_virtual(child) for child in children)


def _bn_no_training(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore: one MAC per element, two with an affine. Formulas return FLOPs, i.e. 2 x MACs."""
    return 2 * prod(input_shape) * (2 if weight_shape is not None else 1)


def _layer_norm(input_shape, normalized_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore: four MACs per element, five with an affine (DeiT-Ti: 1.26 G in SPIN Table 8, 1.25 G without)."""
    return 2 * prod(input_shape) * (5 if weight_shape is not None else 4)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


# Inference BatchNorm reaches the counter as a different op per device and backend (CPU: the first;
# CUDA with an affine: cuDNN's), so every variant gets the same formula. An op is seen once: the
# counter never sees the ops another one calls.
_BATCH_NORMS = (
    aten._native_batch_norm_legit_no_training, aten._batch_norm_no_update, aten.native_batch_norm,
    aten.cudnn_batch_norm, aten.miopen_batch_norm,
)
_EXTRA_FORMULAS = {
    **{op: _bn_no_training for op in _BATCH_NORMS},
    aten.native_layer_norm: _layer_norm,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
}


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds for one sample of shape `input_shape` (no batch dimension), in eval mode."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), torch.zeros(()))
    x = torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_costs(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCosts:
    """Sizes and cost of `model` as given (fold fused SPIN layers first to count what deploys)."""
    params = count_params(model)
    entropy = getattr(model, "entropy", None)  # ArbNet: table-usage entropy (eq. 7)
    if any(p.is_meta for p in model.parameters()):  # shapes only (a dry run): no index to count usage in
        entropy = None
    return ModelCosts(
        unique_params=params.unique,
        virtual_params=params.virtual,
        macs=count_macs(model, input_shape),
        effective_share_rate=params.virtual / params.unique,
        entropy=entropy() if entropy is not None else None,
    )
