import torch
from torch import nn
from timm.models.convmixer import ConvMixer

from sharetune.metrics import count_macs, count_params
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


def test_macs_count_linear_conv_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    conv, bn, linear = 3 * 8 * 9 * 16, 2 * 8 * 16, 8 * 16 * 5
    assert count_macs(model, (3, 4, 4)) == conv + bn + linear


def test_convmixer_768_32_matches_the_spin_paper():
    model = ConvMixer(dim=768, depth=32, kernel_size=3, patch_size=14, act_layer=nn.ReLU)
    assert abs(count_params(model).unique / 1e6 - 20.46) < 0.01  # the paper truncates 20.466 M
    assert round(count_macs(model, (3, 224, 224)) / 1e9, 2) == 5.03


def test_attention_is_counted_on_cpu():
    class SelfAttention(nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    heads, tokens, dim = 2, 8, 4
    assert count_macs(SelfAttention(), (heads, tokens, dim)) == 2 * heads * tokens * tokens * dim  # QK^T and AV
