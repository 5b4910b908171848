"""Trial settings -> model and its costs: the one place the CLI and the trainable build models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharetune.data import Batches
from sharetune.metrics import ModelCosts, model_costs
from sharetune.models import PAPER_MLPS, create_model, deployed, get_model
from sharetune.spaces import ArbNetSettings, FamilySettings, SpinSettings, trial_settings

CKA_SAMPLES = 256  # training inputs the cka mapping compares layers on


class Resize(nn.Module):
    """Resizes inputs to the resolution a trial searches (SPIN Table 4), batch by batch."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class DataShape:
    """What building a model reads of its data: enough to rebuild a trained model without the data."""

    input_shape: tuple[int, ...]
    num_classes: int


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a `Resize` wrapper (build_spin adds one when img_size differs)."""
    return model[-1] if isinstance(model, nn.Sequential) and isinstance(model[0], Resize) else model


def arbnet_widths(s: ArbNetSettings, data: Batches) -> list[int]:
    """Input, hidden and output widths: the paper's net for the data's input width (Section 4.3), unless
    `hidden` says otherwise, else the paper's MNIST net's."""
    in_features = math.prod(data.input_shape)
    paper = next((hidden for (fan_in, hidden, _) in PAPER_MLPS.values() if fan_in == in_features), None)
    hidden = s.hidden or paper or PAPER_MLPS["mnist"][1]
    return [in_features, *hidden, data.num_classes]


def build_arbnet(s: ArbNetSettings, data: Batches) -> nn.Module:
    in_features, *hidden, num_classes = arbnet_widths(s, data)
    return create_model(
        "arbnet_mlp", in_features=in_features, num_classes=num_classes, hidden=tuple(hidden), hash=s.hash, alpha=s.alpha,
        radius=s.radius, sparsity=s.sparsity, table_size=s.table_size, compression=s.compression, seed=s.seed,
    )


def build_spin(
    s: SpinSettings, data: Batches | DataShape, pretrained: dict | None = None, *, unshared: bool = False,
    plan: list[int] | None = None,
) -> nn.Module:
    """`unshared=True` builds the plain network (what fusion's and cka's pretrained weights come from);
    `plan`: bank ids to share by instead of the mapping's (an exported model's: cka's came from data)."""
    if len(data.input_shape) != 3:
        raise ValueError(f"data: SPIN's models take images (channels x height x width), and this data's inputs are "
                         f"{'x'.join(map(str, data.input_shape))}; use an image dataset")
    in_chans, height = data.input_shape[0], data.input_shape[-1]
    img_size = s.img_size or height
    resize = Resize(img_size) if img_size != height else None
    entry = get_model(s.model)
    architecture = {**{name: getattr(s, name) for name in s.ARCHITECTURE}, "img_size": img_size}
    options = {k: v for k, v in architecture.items() if v is not None and k in entry.options}
    sharing, cka_data = None, None
    if not unshared and s.share_rate > 1:
        if plan is not None:
            sharing = {"plan": plan}
        elif s.mapping == "cka":
            sharing = {"share_rate": s.share_rate, "mapping": s.mapping}
            with torch.no_grad():
                cka_data = data.sample_inputs(CKA_SAMPLES)
                cka_data = cka_data if resize is None else resize(cka_data)
        else:
            sharing = {"share_rate": s.share_rate, "mapping": s.mapping, "distribution": s.distribution, "seed": s.seed}
        extras = {"components": s.component_list(), "transform_groups": s.transform_groups, "fusion": s.fusion}
        sharing.update({k: v for k, v in extras.items() if v is not None})
    starts_from = pretrained if sharing is not None and s.needs_pretrained() else None
    model = create_model(s.model, sharing=sharing, pretrained=starts_from, cka_data=cka_data,
                         num_classes=data.num_classes, in_chans=in_chans, **options)
    return model if resize is None else nn.Sequential(resize, model)


def build_model(
    settings: FamilySettings, data: Batches | DataShape, pretrained: dict | None = None, plan: list[int] | None = None
) -> nn.Module:
    """The settings' model for the data, its weights drawn from `settings.seed`: a trial, `sharetune train`
    and a resumed trial start from the same ones."""
    torch.manual_seed(settings.seed)
    if isinstance(settings, ArbNetSettings):
        return build_arbnet(settings, data)
    return build_spin(settings, data, pretrained, plan=plan)


def built_for(model: nn.Module, data: Batches) -> dict:
    """What rebuilding `model` (built from `data`) needs besides its settings, as plain values: the data's
    input shape and classes (what the outputs mean), SPIN's sharing plan as bank ids (a cka plan came
    from the data), and how raw examples become its inputs (`Preprocessing`). Trials keep it in each
    checkpoint, so exporting one needs no data."""
    plan = getattr(unwrap(model), "sharing_plan", None)
    return {"classes": data.class_names(), "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "plan": None if plan is None else list(plan.bank_ids),
            "preprocessing": None if data.preprocessing is None else data.preprocessing.as_dict()}


def rebuild(settings: FamilySettings, record: dict) -> nn.Module:
    """The architecture `built_for` recorded, with fresh weights for the caller to replace."""
    shape = DataShape(tuple(record["input_shape"]), record["num_classes"])
    # fusion builds from pretrained weights: any of the right shapes do, the trained ones replace them
    pretrained = unwrap(build_spin(settings, shape, unshared=True)).state_dict() if settings.needs_pretrained() else None
    return build_model(settings, shape, pretrained, plan=record["plan"])


def costs_of(model: nn.Module, data: Batches) -> ModelCosts:
    """What does not change while training, counted as the model deploys (fused layers folded)."""
    return model_costs(deployed(model), data.input_shape)


def config_costs(config: dict, data: Batches, pretrained: dict | None = None) -> ModelCosts:
    """A trial configuration's costs without training it: how a search checks its constraints before
    starting a trial."""
    settings = trial_settings(config)
    data = data.with_resolution(settings.resolution)
    with torch.no_grad():
        return costs_of(build_model(settings, data, pretrained), data)
