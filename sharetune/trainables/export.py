"""A trial's deployable model as one torch file, for use outside Ray and MLflow.

The file holds plain values and tensors only, so `torch.load(weights_only=True)` reads it: the
trial's settings (as a config), what the model was built for (`build.built_for`: the data's input
shape, classes and preprocessing, SPIN's sharing plan as bank ids), and the state_dict of the model as it deploys
(fused layers folded; an ArbNet layer stores its table and recomputes its index). Both writing and
reading it rebuild the architecture from the settings and that record, without the data.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from sharetune.data import Preprocessing
from sharetune.errors import first_line
from sharetune.models import deployed
from sharetune.models.weights import load_plain
from sharetune.spaces import FamilySettings, trial_settings
from sharetune.trainables.build import rebuild
from sharetune.trainables.trial import BUILT_FOR, CHECKPOINT, evaluated_weights

EXPORT_FORMAT = "sharetune-model-1"


def export_trial(config: dict, checkpoint: str | Path, out: str | Path) -> None:
    """Write the model of the trial `config` whose checkpoint folder is `checkpoint` to the file `out`.
    ValueError for a checkpoint that does not record what its model was built for."""
    try:
        state = load_plain(Path(checkpoint) / CHECKPOINT)
    except (pickle.UnpicklingError, EOFError, RuntimeError):  # torch's errors for a file cut short, or another
        raise ValueError(f"its checkpoint {Path(checkpoint) / CHECKPOINT} cannot be read: it is cut short, not "
                         "a torch file, or holds objects torch would load as code") from None
    if BUILT_FOR not in state:
        raise ValueError("its checkpoint was written by an older sharetune, which did not record the model's input "
                         "shape and sharing plan; export it with that version")
    settings = trial_settings(config)
    model = rebuild(settings, state[BUILT_FOR])
    model.load_state_dict(evaluated_weights(state))
    save_exported(config["family"], settings, model, state[BUILT_FOR], out)


def save_exported(family: str, settings: FamilySettings, model: nn.Module, built: dict, out: str | Path) -> None:
    """Write `model` (as evaluation runs it: the EMA's, where the recipe keeps one) of `family` with
    `settings`, and what it was built for (`build.built_for`), to the file `out`, deployed. OSError in
    one line where it cannot be written; no half file stays."""
    exported = {"format": EXPORT_FORMAT, "config": {"family": family, **settings.model_dump(mode="json")},
                **built, "state_dict": deployed(model).state_dict()}
    try:
        torch.save(exported, out)
    except (OSError, RuntimeError) as err:  # torch's writer fails with RuntimeErrors
        if Path(out).is_file():  # a disk that filled leaves no half model behind
            Path(out).unlink()
        raise OSError(f"cannot be written ({getattr(err, 'strerror', None) or first_line(err)})") from None


def read_exported(path: str | Path) -> dict:
    """What `sharetune export` wrote to `path`. ValueError for any other file: one that is no torch file,
    or that holds objects (torch's refusal would suggest loading them as code)."""
    refusal = ValueError(f"{path}: not a model written by `sharetune export` ({EXPORT_FORMAT})")
    try:
        saved = load_plain(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError):
        raise refusal from None
    if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT:
        raise refusal
    return saved


def load_exported(path: str | Path) -> nn.Module:
    """The model `sharetune export` wrote, on the CPU in eval mode; it reads what `load_preprocessing`
    makes of raw examples."""
    saved = read_exported(path)
    model = deployed(rebuild(trial_settings(saved["config"]), saved))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def load_preprocessing(path: str | Path) -> Preprocessing:
    """How the model `sharetune export` wrote wants its inputs: call it on a PIL image (or raw values)
    for one input. ValueError where its trial's checkpoint, written by an older sharetune, recorded none."""
    record = read_exported(path).get("preprocessing")
    if record is None:
        raise ValueError(f"{path}: its trial did not record its preprocessing (a checkpoint an older sharetune "
                         "wrote, or data built in memory rather than by sharetune.data.load)")
    return Preprocessing.from_dict(record)
