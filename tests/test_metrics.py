import pytest
import torch
from helpers import DEVICES
from timm.models.convmixer import ConvMixer
from torch import nn

from sharetune.metrics import count_macs, count_params
from sharetune.models import create_model
from sharetune.models.arbnet import ArbNetMLP


def test_shared_modules_count_once_as_unique_and_per_use_as_virtual():
    shared = nn.Linear(10, 10)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(10, 2))
    counts = count_params(model)
    assert counts.unique == 110 + 22
    assert counts.virtual == 2 * 110 + 22


def test_arbnet_counts_table_as_unique_and_dense_shape_as_virtual():
    model = ArbNetMLP(784, [200, 200], 10, hash="uniform", table_size=1000)
    counts = count_params(model)
    biases_and_bn = (200 + 200 + 10) + 2 * (200 + 200 + 10)
    assert counts.unique == 3 * 1000 + biases_and_bn
    assert counts.virtual == 784 * 200 + 200 * 200 + 200 * 10 + biases_and_bn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
def test_macs_count_linear_conv_and_batchnorm(device, affine):
    batch_norm = nn.BatchNorm2d(8, affine=affine)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), batch_norm, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5)).to(device)
    conv, bn, linear = 3 * 8 * 9 * 16, (2 if affine else 1) * 8 * 16, 8 * 16 * 5
    assert count_macs(model, (3, 4, 4)) == conv + bn + linear


@pytest.mark.parametrize("device", DEVICES)
def test_convmixer_768_32_matches_the_spin_paper(device):
    model = ConvMixer(dim=768, depth=32, kernel_size=3, patch_size=14, act_layer=nn.ReLU).to(device)
    assert abs(count_params(model).unique / 1e6 - 20.46) < 0.01  # the paper truncates 20.466 M
    assert round(count_macs(model, (3, 224, 224)) / 1e9, 2) == 5.03


@pytest.mark.parametrize("device", DEVICES)
def test_deit_tiny_matches_the_spin_paper(device):
    model = create_model("deit_tiny").to(device)
    assert round(count_params(model).unique / 1e6, 1) == 5.7
    assert round(count_macs(model, (3, 224, 224)) / 1e9, 2) == 1.26  # attention's matmuls and LayerNorms included
    assert round(count_macs(create_model("deit_small").to(device), (3, 224, 224)) / 1e9, 2) == 4.61


def test_layer_norm_counts_as_fvcore_does():
    elements = 4 * 8 * 8
    assert count_macs(nn.LayerNorm(8), (4, 8, 8)) == 5 * elements
    assert count_macs(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)), (4, 8, 8)) == 8 * elements + 4 * elements


@pytest.mark.parametrize("device", DEVICES)
def test_attention_is_counted_on_every_device(device):
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))  # places the input: count_macs follows the parameters

        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x) * self.scale  # elementwise: free

    heads, tokens, dim = 2, 8, 4
    assert count_macs(SelfAttention().to(device), (heads, tokens, dim)) == 2 * heads * tokens * tokens * dim  # QK^T and AV
