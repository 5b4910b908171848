"""`sharetune export`: one trial of a past search as a deployable model file, which
`sharetune.trainables.load_exported` reads without Ray, MLflow or the data."""

from __future__ import annotations

from pathlib import Path

from sharetune.search.storage import SearchFolder
from sharetune.search.tuner import load_data
from sharetune.trainables import export_trial, pretrained_weights, run_checkpoint


def export(folder: SearchFolder, trial_id: str, out: str | Path) -> None:
    """FileNotFoundError where `folder` holds no search; ValueError for a trial it does not hold, or one
    without a checkpoint."""
    spec = folder.spec()
    trials = {trial.trial_id: trial for trial in folder.tune_trials()}
    trial = trials.get(trial_id)
    if trial is None:
        raise ValueError(f"--trial: no trial {trial_id!r} in {folder}; its trials: {', '.join(sorted(trials)) or 'none yet'}")
    try:
        checkpoint = trial.checkpoint or run_checkpoint(folder, trial_id)  # a trial on several workers: its Ray Train run's
    except ValueError as err:
        raise ValueError(f"--trial: {trial_id}: {err}") from None
    if checkpoint is None:
        raise ValueError(f"--trial: {trial_id} has no checkpoint (status {trial.status}): it finished no epoch")
    data = load_data(spec)
    with checkpoint.as_directory() as directory:
        export_trial(trial.config, data, pretrained_weights(spec, data, folder), directory, out)
