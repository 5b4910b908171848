"""The launch-saving paths for GPUs, checked for exactness on CPU (and on CUDA where present): an
ArbNetMLP's tables read by one index_select, and every fused SPIN bank entry computed in one batch."""

import copy

import pytest
import torch
from helpers import DEVICES
from torch.profiler import ProfilerActivity, profile

from sharetune.models import FUSIONS, create_model, fold
from sharetune.models.arbnet import ArbNetMLP
from sharetune.models.table_ops import KERNEL_ENV


def calls(fn, name: str) -> int:
    """How many times `fn()` runs the operator `name` (e.g. aten::index_select)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == name)


@pytest.mark.parametrize("device", DEVICES)
def test_an_arbnet_mlp_on_the_index_select_path_gathers_every_layer_in_one_call_with_the_same_gradients(device, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "torch")  # what CUDA always takes
    torch.manual_seed(0)
    options = dict(hash=["hashednets", "uniform", "dirichlet"], alpha=[None, None, 0.5], table_size=[50, 40, 30], sparsity=[0.2, 0.0, 0.1])
    model = ArbNetMLP(30, [20, 20], 5, **options).to(device)
    x = torch.randn(16, 30, device=device)
    assert calls(lambda: model(x), "aten::index_select") == 1
    model(x).square().sum().backward()
    reference = copy.deepcopy(model)
    for layer in reference.arb_layers():
        layer.table.grad = None
    weights = [layer.dense_weight() for layer in reference.arb_layers()]  # one layer at a time
    for got, layer in zip(weights, model.arb_layers()):
        plain = torch.cat([layer.table, layer.table.new_zeros(1)])[layer.index.long()]
        plain = plain if layer.sign is None else plain * layer.sign
        torch.testing.assert_close(got, plain.view_as(got))
    h = x
    for module, weight in zip(reference.layers, [w for w in weights for _ in range(3)]):
        h = module(h, weight) if type(module).__name__ == "ArbLinear" else module(h)
    h.square().sum().backward()
    for layer, expected in zip(model.arb_layers(), reference.arb_layers()):
        torch.testing.assert_close(layer.table.grad, expected.table.grad, rtol=1e-5, atol=1e-5)


def fused_convmixer(strategy: str, depth: int = 8, components=("pointwise",), device: str = "cpu"):
    torch.manual_seed(0)
    arch = dict(dim=16, depth=depth, patch_size=2, kernel_size=3, num_classes=4, in_chans=1)
    unshared = create_model("convmixer", **arch)
    model = create_model("convmixer", **arch, pretrained=unshared.state_dict(),
                         sharing={"share_rate": 2, "fusion": strategy, "components": list(components)})
    with torch.no_grad():  # away from their initial values, so every strategy's parameters matter
        for name, p in model.named_parameters():
            if "alpha" in name or "mix" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", [s for s in FUSIONS if s != "choose_first"])
def test_fusion_batches_every_entry_and_gives_the_per_layer_outputs_and_gradients(strategy, device):
    model = fused_convmixer(strategy, depth=7, device=device)  # entries of 2, 2, 2 and 1 layers: two kinds
    per_layer = copy.deepcopy(model)
    per_layer._forward_pre_hooks.clear()  # every FusedLayer computes its own weight, as before batching
    x = torch.randn(8, 1, 8, 8, device=device)
    out, expected = model(x), per_layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(per_layer.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not any("fused" in layer.__dict__ for layer in model.spin_bank.children())  # nothing held after a forward
    torch.testing.assert_close(fold(model).eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_fused_step_stacks_once_per_kind_of_entry_not_once_per_layer():
    model = fused_convmixer("channel_weighted_mean", depth=8)  # 4 entries of 2 layers, each with a bias
    x = torch.randn(4, 1, 8, 8)
    assert calls(lambda: model(x), "aten::stack") == 3  # the sources, the alphas, the biases
    per_layer = copy.deepcopy(model)
    per_layer._forward_pre_hooks.clear()
    assert calls(lambda: per_layer(x), "aten::stack") == 16  # before: sources and biases, for each of 8 layers
