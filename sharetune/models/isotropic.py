"""Isotropic networks for SPIN: ConvMixer and DeiT from timm, and an isotropic ConvNeXt.

Every builder returns a model whose repeated layers sit in `model.blocks`, which is what
`sharetune.models.spin.share` walks, and registers with the components SPIN can share in a block.
timm is imported by the builders that use it: importing it (and the torchvision and torch._dynamo
it brings) costs about 3.5 s, which every trial process of an ArbNet search would pay for nothing.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from sharetune.models.registry import register_model

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


# Shared by default (SPIN Table 1): ConvMixer's pointwise convs; Table 9 shares its pointwise and
# depthwise weights, the conv biases and the BatchNorms separately, or whole layers.
CONVMIXER_COMPONENTS = {
    "pointwise": ("1.weight",), "depthwise": ("0.fn.0.weight",), "bias": ("1.bias", "0.fn.0.bias"),
    "batchnorm": ("0.fn.2", "3"), "pointwise_conv": ("1",), "depthwise_conv": ("0.fn.0",),
}
CONVNEXT_COMPONENTS = {"block": ("",), "depthwise": ("conv_dw",), "mlp": ("mlp",), "norm": ("norm",)}
DEIT_COMPONENTS = {"block": ("",), "attn": ("attn",), "mlp": ("mlp",)}  # shared by default: attn and mlp, the
# LayerNorms stay each layer's own (Table 8's WS-DeiT-S: 11.41 M at rate 2, whole blocks would be 11.40 M)


@register_model("convmixer", components=CONVMIXER_COMPONENTS, default_components=("pointwise",))
def convmixer(
    dim: int = 768, depth: int = 32, patch_size: int = 14, kernel_size: int = 3,
    num_classes: int = 1000, in_chans: int = 3, act: str = "relu", img_size: int | None = None, **kwargs,
) -> nn.Module:
    """ConvMixer C/D/P/K (SPIN uses ReLU; timm's default is GELU). Fully convolutional: any image size,
    so `img_size` is accepted (every isotropic model takes it) and changes nothing."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; allowed: {', '.join(ACTIVATIONS)}")
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim, depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                     num_classes=num_classes, act_layer=ACTIVATIONS[act], **kwargs)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022): 7x7 depthwise conv, LayerNorm, 4x MLP, residual. The isotropic
    ConvNeXt has no layer scale (`layer_scale_init_value=0` in the authors' convnext_isotropic.py)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


@register_model("convnext_isotropic", components=CONVNEXT_COMPONENTS, default_components=("block",))
class ConvNeXtIsotropic(nn.Module):
    """The isotropic ConvNeXt of the ConvNeXt paper (section 5): a 16x16 patch stem, `depth` blocks at
    one width, global average pooling, LayerNorm and a linear head. ConvNeXt-S-iso: dim 384, depth 18."""

    def __init__(self, dim: int = 384, depth: int = 18, patch_size: int = 16, kernel_size: int = 7,
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0, img_size: int | None = None):
        super().__init__()  # fully convolutional up to its pooling: `img_size` changes nothing
        self.stem = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, kernel_size, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for module in self.modules():  # the authors' initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


DEIT_HEADS = {"tiny": 3, "small": 6}  # attention heads of timm's deit_*_patch16_224 (the DeiT paper's)


def deit(
    variant: str, dim: int | None = None, depth: int | None = None, patch_size: int = 16, img_size: int = 224,
    num_classes: int = 1000, in_chans: int = 3, **kwargs,
) -> nn.Module:
    """DeiT-Ti / DeiT-S from timm (no pretrained weights: nothing is fetched from a hub); `dim` is timm's
    embed_dim, so every isotropic model takes the same architecture settings."""
    import timm

    if dim is not None and dim % DEIT_HEADS[variant]:  # timm's own words name neither the setting nor the heads
        heads = DEIT_HEADS[variant]
        raise ValueError(f"dim: {dim} is not a multiple of deit_{variant}'s {heads} attention heads; allowed: multiples of {heads}")
    sizes = {k: v for k, v in {"embed_dim": dim, "depth": depth}.items() if v is not None}
    return timm.create_model(f"deit_{variant}_patch16_224", pretrained=False, patch_size=patch_size, img_size=img_size,
                             num_classes=num_classes, in_chans=in_chans, **sizes, **kwargs)


for _variant in ("tiny", "small"):
    register_model(f"deit_{_variant}", components=DEIT_COMPONENTS, default_components=("attn", "mlp"))(partial(deit, _variant))
