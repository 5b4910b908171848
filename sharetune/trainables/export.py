"""A trial's deployable model as one torch file, for use outside Ray and MLflow.

The file holds plain values and tensors only, so `torch.load(weights_only=True)` reads it: the
trial's settings (as a config), the data's input shape and classes, SPIN's sharing plan as bank ids
(a cka plan came from data the loader has not got), and the state_dict of the model as it deploys
(fused layers folded; an ArbNet layer stores its table and recomputes its index). `load_exported`
rebuilds the architecture from the settings and loads the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sharetune.data import Batches
from sharetune.models import deployed
from sharetune.spaces import trial_settings
from sharetune.trainables.build import DataShape, build_model, build_spin, unwrap
from sharetune.trainables.trial import CHECKPOINT, evaluated_weights

EXPORT_FORMAT = "sharetune-model-1"


def export_trial(config: dict, data: Batches, pretrained: dict | None, checkpoint: str | Path, out: str | Path) -> None:
    """Write the model of the trial `config` whose checkpoint folder is `checkpoint` to the file `out`."""
    settings = trial_settings(config)
    data = data.with_resolution(settings.resolution)
    model = build_model(settings, data, pretrained)
    model.load_state_dict(evaluated_weights(torch.load(Path(checkpoint) / CHECKPOINT, map_location="cpu", weights_only=True)))
    shipped = deployed(model)
    plan = getattr(unwrap(shipped), "sharing_plan", None)
    torch.save({
        "format": EXPORT_FORMAT, "config": {"family": config["family"], **settings.model_dump(mode="json")},
        "input_shape": list(data.input_shape), "num_classes": data.num_classes, "classes": data.class_names(),
        "plan": None if plan is None else list(plan.bank_ids), "state_dict": shipped.state_dict(),
    }, out)


def load_exported(path: str | Path) -> nn.Module:
    """The model `sharetune export` wrote, on the CPU in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a model written by `sharetune export` ({EXPORT_FORMAT})")
    settings = trial_settings(saved["config"])
    data = DataShape(tuple(saved["input_shape"]), saved["num_classes"])
    # fusion builds from pretrained weights: any of the right shapes do, the exported ones replace them
    pretrained = unwrap(build_spin(settings, data, unshared=True)).state_dict() if settings.needs_pretrained() else None
    model = deployed(build_model(settings, data, pretrained, plan=saved["plan"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
