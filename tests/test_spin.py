import io
import itertools

import pytest
import torch
from helpers import DEVICES

from sharetune.metrics import count_macs, count_params
from sharetune.models import create_model, fold
from sharetune.models.spin import DISTRIBUTIONS, MAPPINGS, SharingPlan


@pytest.mark.parametrize("mapping, distribution", list(itertools.product(MAPPINGS, DISTRIBUTIONS)))
@pytest.mark.parametrize("depth, share_rate", [(32, 2), (12, 3), (18, 4), (8, 1), (16, 4), (32, 1.5), (32, 1.86), (20, 2.5)])
def test_every_topology_covers_each_layer_once_with_the_right_bank(mapping, distribution, depth, share_rate):
    plan = SharingPlan.from_topology(depth, share_rate, mapping, distribution, seed=1)
    assert plan.depth == depth
    entries = plan.num_entries
    if distribution == "uniform" or share_rate == 1:
        assert entries == -(-depth // share_rate)
    else:
        assert abs(depth / entries - share_rate) <= 0.5 * share_rate  # the section's rate is share_rate + 1, the rest unshared
    assert sorted(set(plan.bank_ids)) == list(range(entries))


def test_paper_topologies_at_depth_32_rate_2():
    assert SharingPlan.from_topology(32, 2, "sequential").bank_ids[:4] == (0, 0, 1, 1)
    assert SharingPlan.from_topology(32, 2, "strided").bank_ids[:3] == (0, 1, 2)
    assert SharingPlan.from_topology(32, 2, "strided").bank_ids[16] == 0
    for distribution in ("front", "middle", "back"):
        assert SharingPlan.from_topology(32, 2, "sequential", distribution).num_entries == 16
    middle = SharingPlan.from_topology(32, 2, "pyramid", "middle")
    assert middle.bank_ids[:4] == (0, 1, 2, 3) and middle.bank_ids[-4:] == (12, 13, 14, 15)
    random = SharingPlan.from_topology(32, 2, "random", seed=3)
    assert random != SharingPlan.from_topology(32, 2, "sequential") and random.num_entries == 16


def test_notation_reproduces_the_middle_pyramid_of_table_1():
    plan = SharingPlan.from_notation("[4x1,1x2,2x3,2x4,2x3,1x2,4x1]")
    assert plan.depth == 32 and plan.num_entries == 16 and plan.share_rate == 2
    assert [plan.bank_ids.count(e) for e in range(16)] == [1, 1, 1, 1, 2, 3, 3, 4, 4, 3, 3, 2, 1, 1, 1, 1]
    assert SharingPlan.from_notation("[4X1, 1×2,2x3,2x4,2x3,1x2,4x1]") == plan


def test_uneven_rate_spreads_the_layers_evenly_over_its_entries():
    plan = SharingPlan.from_topology(18, 4)
    assert [plan.bank_ids.count(e) for e in range(plan.num_entries)] == [4, 4, 4, 3, 3]
    plan = SharingPlan.from_topology(32, 1.5)  # 22 entries, not the 16 of rate 2
    assert plan.num_entries == 22 and sorted({plan.bank_ids.count(e) for e in range(22)}) == [1, 2]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SharingPlan.from_topology(8, 0.5), "share_rate: must be between 1 and the depth"),
        (lambda: SharingPlan.from_topology(8, 9), "share_rate: must be between 1 and the depth"),
        (lambda: create_model("convmixer", dim=8, depth=4, sharing={"mapping": "strided"}), "sharing: needs share_rate"),
        (lambda: SharingPlan.from_topology(8, 2, "zigzag"), "mapping: unknown value 'zigzag'; allowed: sequential"),
        (lambda: SharingPlan.from_topology(8, 2, distribution="edges"), "distribution: unknown value 'edges'"),
        (lambda: SharingPlan.from_notation("4 by 2"), "not N x S notation"),
        (lambda: SharingPlan((0, 2)), "plan: bank ids must be 0..1"),
        (lambda: create_model("convmixer", dim=8, depth=4, sharing="[1x2]"), "plan: covers 2 layers but the model has 4"),
        (lambda: create_model("convmixer", dim=8, depth=4, sharing={"share_rate": 2, "components": ["fins"]}), "components: unknown component 'fins'"),
        (lambda: create_model("resnet50"), "model: unknown model 'resnet50'"),
    ],
)
def test_bad_plans_are_refused_with_the_field_named(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build()


@pytest.mark.parametrize(
    "components, params",
    [(["batchnorm", "bias", "depthwise", "pointwise"], 10.84), (["bias", "depthwise", "pointwise"], 10.89), (["depthwise", "pointwise"], 10.92), (["pointwise"], 11.02)],
)
def test_component_ablation_matches_table_9(components, params):
    model = create_model("convmixer", dim=768, depth=32, patch_size=14, kernel_size=3, sharing={"share_rate": 2, "components": components})
    assert abs(count_params(model).unique / 1e6 - params) < 0.01  # the paper rounds or truncates to 0.01 M


def test_timm_ema_updates_each_bank_entry_once():
    from timm.utils import ModelEmaV3

    model = small_shared_convmixer()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        model.spin_bank["1_weight__0"].add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.spin_bank["1_weight__0"], model.spin_bank["1_weight__0"] - 0.5)


def test_spin_parameter_counts_match_the_paper():
    millions = lambda model: count_params(model).unique / 1e6
    convmixer = dict(dim=768, depth=32, patch_size=14, kernel_size=3)
    assert abs(millions(create_model("convmixer", **convmixer)) - 20.46) < 0.01
    rate2 = create_model("convmixer", **convmixer, sharing={"share_rate": 2, "mapping": "sequential", "distribution": "uniform", "components": ["pointwise"]})
    assert abs(millions(rate2) - 11.02) < 0.01
    assert round(millions(create_model("convmixer", **convmixer, sharing={"share_rate": 4})), 1) == 6.3
    assert round(count_macs(rate2, (3, 224, 224)) / 1e9, 2) == 5.03  # sharing leaves MACs unchanged
    assert count_params(rate2).virtual == count_params(create_model("convmixer", **convmixer)).virtual
    assert round(millions(create_model("deit_tiny", sharing={"share_rate": 2})), 2) == 3.05
    assert round(millions(create_model("deit_tiny", sharing={"share_rate": 3})), 2) == 2.16
    # Table 8's WS-DeiT-S: attention and MLP shared, each layer keeps its LayerNorms (whole blocks: 11.40, 7.86)
    assert round(millions(create_model("deit_small", sharing={"share_rate": 2})), 2) == 11.41
    assert round(millions(create_model("deit_small", sharing={"share_rate": 3})), 2) == 7.87
    assert round(millions(create_model("convnext_isotropic", dim=384, depth=18)), 1) == 22.3


def small_shared_convmixer():
    torch.manual_seed(0)
    return create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1, sharing={"share_rate": 2, "components": ["pointwise", "depthwise"]})


@pytest.mark.parametrize("device", DEVICES)
def test_each_bank_entry_is_stored_and_updated_once(device):
    model = small_shared_convmixer().to(device)  # moving keeps every alias on the one bank tensor
    names = list(model.state_dict())
    pointwise = [n for n in names if n.startswith("spin_bank.1_weight__")]
    assert len(pointwise) == 2  # depth 4 at rate 2
    assert not any(n.startswith("blocks.1.1.weight") for n in names)  # the layers hold no copy
    assert "blocks.1.1.bias" in names  # biases are a component of their own, unshared here
    stored = [n for n in names if "running" not in n and "num_batches" not in n]
    assert len(stored) == len(list(model.parameters()))  # every stored tensor is one trainable parameter
    shared = model.spin_bank["1_weight__0"]
    assert model.blocks[0][1].weight is shared and model.blocks[1][1].weight is shared
    before = shared.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 8, 8, device=device)).sum().backward()
    grad = shared.grad.clone()
    opt.step()
    torch.testing.assert_close(shared.detach(), before - 0.1 * grad)  # one update, from both layers' gradients


def test_checkpoint_reloads_into_an_equal_model():
    model = small_shared_convmixer().eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1, sharing={"share_rate": 2, "components": ["pointwise", "depthwise"]}).eval()
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(other(x), model(x))
    assert count_params(other).unique < count_params(other).virtual


def test_transforms_reproduce_table_2_counts():
    convmixer = dict(dim=768, depth=32, patch_size=14, kernel_size=3)
    dense = count_params(create_model("convmixer", **convmixer)).virtual
    for groups, params, gmacs in [(1, 11.05, 5.04), (16, 11.20, 5.17), (64, 11.80, 5.63)]:
        model = create_model("convmixer", **convmixer, sharing={"share_rate": 2, "transform_groups": groups})
        assert abs(count_params(model).unique / 1e6 - params) < 0.04
        assert count_params(model).virtual == dense  # the unshared model's size: transforms are the sharing's cost
        assert abs(count_macs(model, (3, 224, 224)) / 1e9 - gmacs) < 0.015


def test_transforms_start_as_plain_sharing():
    shared = small_shared_convmixer().eval()
    torch.manual_seed(0)  # the same initial weights as small_shared_convmixer()
    transformed = create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1, sharing={"share_rate": 2, "components": ["pointwise", "depthwise"], "transform_groups": 4}).eval()
    assert count_params(transformed).unique > count_params(shared).unique
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(transformed(x), shared(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["choose_first", "mean", "scalar_weighted_mean", "channel_weighted_mean", "pointwise_conv"])
def test_fusion_trains_the_pretrained_weights_and_folds_exactly(strategy, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the fold is compared in full float32
    torch.manual_seed(0)
    pretrained = create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1)
    fused = create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1, pretrained=pretrained.state_dict(), sharing={"share_rate": 2, "fusion": strategy}).to(device)
    x = torch.randn(4, 1, 8, 8, device=device)
    fused(x).square().sum().backward()
    entry = fused.spin_bank["1__0"]  # the fused pointwise layer of bank entry 0
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in entry.sources)  # every V_j it keeps learns
    assert len(entry.sources) == (1 if strategy == "choose_first" else 2)
    assert [name for name, p in fused.named_parameters() if p.grad is None] == []  # DDP refuses unused parameters
    for name in ("alpha", "mix"):
        if hasattr(entry, name):
            assert getattr(entry, name).grad.abs().sum() > 0  # and so do the fusion weights
    fused.eval()
    folded = fold(fused)
    torch.testing.assert_close(folded(x), fused(x), rtol=1e-5, atol=1e-5)
    assert (count_params(folded).unique < count_params(fused).unique) == (strategy != "choose_first")  # V_1 alone is the folded weight
    assert count_params(folded).unique == count_params(small_shared_convmixer_pointwise()).unique


TINY = {"convmixer": dict(dim=16, depth=4, patch_size=2, kernel_size=3), "convnext_isotropic": dict(dim=16, depth=4, patch_size=2),
        "deit_tiny": dict(dim=24, depth=4, patch_size=4, img_size=8)}


@pytest.mark.parametrize("strategy", ["scalar_weighted_mean", "pointwise_conv"])
@pytest.mark.parametrize("name, components", [("deit_tiny", None), ("deit_tiny", ["block"]), ("convnext_isotropic", None),
                                               ("convnext_isotropic", ["mlp", "norm"]), ("convmixer", ["depthwise_conv"])])
def test_fusion_fuses_every_layer_of_a_shared_module_and_folds_to_plain_sharing(name, components, strategy):
    """SPIN Table 8 fuses DeiT: a shared module fuses each layer it holds (LayerNorms averaged, as biases)."""
    torch.manual_seed(0)
    arch = {**TINY[name], "num_classes": 3, "in_chans": 1}
    sharing = {"share_rate": 2} if components is None else {"share_rate": 2, "components": components}
    fused = create_model(name, **arch, pretrained=create_model(name, **arch).state_dict(), sharing={**sharing, "fusion": strategy})
    x = torch.randn(2, 1, 8, 8)
    fused(x).square().sum().backward()
    assert [n for n, p in fused.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    fused.eval()
    folded = fold(fused)
    torch.testing.assert_close(folded(x), fused(x), rtol=1e-5, atol=1e-5)
    assert count_params(folded).unique == count_params(create_model(name, **arch, sharing=sharing)).unique


@pytest.mark.parametrize("name, sharing, message", [
    ("convmixer", {"fusion": "mean", "components": ["bias"]}, "'bias' shares only their bias; convmixer's components that fuse: pointwise, depthwise, pointwise_conv"),
    ("convmixer", {"fusion": "mean", "components": ["batchnorm"]}, r"'batchnorm' holds a BatchNorm2d \(0.fn.2\)"),
    ("deit_tiny", {"transform_groups": 2}, r"transform_groups: transforms act on shared weights, not whole modules \(attn, mlp\); deit_tiny has none"),
    ("convnext_isotropic", {"transform_groups": 2, "components": ["block"]}, "not whole modules"),
])
def test_sharing_a_model_cannot_take_is_refused_with_the_field_named(name, sharing, message):
    arch = {**TINY[name], "num_classes": 3, "in_chans": 1}
    pretrained = create_model(name, **arch).state_dict() if "fusion" in sharing else None
    with pytest.raises(ValueError, match=message):
        create_model(name, **arch, pretrained=pretrained, sharing={"share_rate": 2, **sharing})


def small_shared_convmixer_pointwise():
    return create_model("convmixer", dim=16, depth=4, patch_size=2, kernel_size=3, num_classes=3, in_chans=1, sharing={"share_rate": 2, "components": ["pointwise_conv"]})


def test_fusion_without_pretrained_weights_is_refused():
    with pytest.raises(ValueError, match="fusion: needs pretrained"):
        create_model("convmixer", dim=8, depth=4, sharing={"share_rate": 2, "fusion": "mean"})


@pytest.mark.parametrize("device", DEVICES)
def test_a_small_shared_convmixer_learns_real_mnist(mnist_subset, device):
    from sharetune.recipes import Recipe
    from sharetune.training import train_epochs

    torch.manual_seed(0)
    model = create_model("convmixer", dim=32, depth=4, patch_size=4, kernel_size=5, num_classes=10, in_chans=1, sharing={"share_rate": 2, "mapping": "sequential"})
    results = list(train_epochs(model, mnist_subset, Recipe(epochs=3, lr=0.05, batch_size=64), device=device))
    assert results[-1].test_accuracy > 0.7  # chance is 0.1


def test_every_isotropic_model_takes_the_same_architecture_settings_and_names_a_wrong_one():
    for name in ("convmixer", "convnext_isotropic"):  # fully convolutional: the resolution changes nothing
        small = create_model(name, dim=8, depth=2, patch_size=4, kernel_size=3, num_classes=3, img_size=32)
        assert count_params(small) == count_params(create_model(name, dim=8, depth=2, patch_size=4, kernel_size=3, num_classes=3))
    with pytest.raises(ValueError, match="bogus: not an option of convnext_isotropic; it takes: dim, depth"):
        create_model("convnext_isotropic", dim=8, depth=2, bogus=1)
