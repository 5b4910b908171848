"""Trial config -> model: the one place that turns validated settings into create_model calls."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sharetune.data import TensorData
from sharetune.models import create_model
from sharetune.models.arbnet import PAPER_MLPS
from sharetune.spaces.settings import FAMILIES, ArbNetSettings, SpinSettings


class Resize(nn.Module):
    """Resizes inputs to the resolution a trial searches (SPIN Table 4), batch by batch."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a `Resize` wrapper (build_spin adds one when img_size differs)."""
    return model[-1] if isinstance(model, nn.Sequential) and isinstance(model[0], Resize) else model


def build_arbnet(s: ArbNetSettings, data: TensorData) -> nn.Module:
    in_features = data.x_train[0].numel()
    paper = next((hidden for (fan_in, hidden, _) in PAPER_MLPS.values() if fan_in == in_features), (200, 200))
    table_size = s.table_size if s.table_size is not None or s.compression is not None or s.hash == "identity" else 1000
    return create_model(
        "arbnet_mlp", in_features=in_features, hidden=tuple(s.hidden or paper), num_classes=data.num_classes,
        hash=s.hash, alpha=s.alpha, radius=s.radius, sparsity=s.sparsity, table_size=table_size,
        compression=s.compression, seed=s.seed,
    )


def build_spin(s: SpinSettings, data: TensorData, pretrained: dict | None = None, *, unshared: bool = False) -> nn.Module:
    """`unshared=True` builds the plain network (what fusion's pretrained weights come from)."""
    in_chans, height = data.input_shape[0], data.input_shape[-1]
    img_size = s.img_size or height
    options = {k: v for k, v in {"depth": s.depth, "patch_size": s.patch_size}.items() if v is not None}
    if s.dim is not None:
        options["embed_dim" if s.model.startswith("deit") else "dim"] = s.dim
    if s.kernel_size is not None and not s.model.startswith("deit"):
        options["kernel_size"] = s.kernel_size
    if s.model.startswith("deit"):
        options["img_size"] = img_size
    sharing = None
    if not unshared and s.share_rate > 1:
        sharing = {"rate": s.share_rate, "mapping": s.mapping, "distribution": s.distribution, "seed": s.seed}
        extras = {"components": s.component_list(), "transform_groups": s.transform_groups, "fusion": s.fusion}
        sharing.update({k: v for k, v in extras.items() if v is not None})
    fused = sharing is not None and s.fusion is not None
    model = create_model(s.model, sharing=sharing, pretrained=pretrained if fused else None,
                         num_classes=data.num_classes, in_chans=in_chans, **options)
    return nn.Sequential(Resize(img_size), model) if img_size != height else model


def build_model(config: dict, data: TensorData, pretrained: dict | None = None) -> nn.Module:
    family = config["family"]
    settings = settings_of(config)
    return build_arbnet(settings, data) if family == "arbnet" else build_spin(settings, data, pretrained)


def settings_of(config: dict) -> ArbNetSettings | SpinSettings:
    """The trial's settings: Ray/Optuna's config minus the bookkeeping keys."""
    cls = FAMILIES[config["family"]]
    return cls(**{k: v for k, v in config.items() if k in cls.model_fields})
