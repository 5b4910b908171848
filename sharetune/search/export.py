"""`sharetune export`: one trial of a past search as a deployable model file, which
`sharetune.trainables.load_exported` reads without Ray, MLflow or the data."""

from __future__ import annotations

from pathlib import Path

from sharetune.search.storage import SearchFolder
from sharetune.search.tuner import load_data
from sharetune.trainables import export_trial, pretrained_weights, run_checkpoint


class SearchExport:
    """A past search's trials as model files. Its trials are read once, and its data and pretrained
    weights once, when the first trial is written (a front of trials is exported together)."""

    def __init__(self, folder: SearchFolder) -> None:
        """FileNotFoundError where `folder` holds no search."""
        self.folder, self.spec = folder, folder.spec()
        self.trials = {trial.trial_id: trial for trial in folder.tune_trials()}
        self.loaded: tuple | None = None  # (data, pretrained weights)

    def __call__(self, trial_id: str, out: str | Path) -> None:
        """ValueError for a trial the search does not hold, or one without a checkpoint."""
        trial = self.trials.get(trial_id)
        if trial is None:
            raise ValueError(f"--trial: no trial {trial_id!r} in {self.folder}; its trials: "
                             f"{', '.join(sorted(self.trials)) or 'none yet'}")
        try:
            checkpoint = trial.checkpoint or run_checkpoint(self.folder, trial_id)  # a trial on several workers: its Ray Train run's
        except ValueError as err:
            raise ValueError(f"--trial: {trial_id}: {err}") from None
        if checkpoint is None:
            raise ValueError(f"--trial: {trial_id} has no checkpoint (status {trial.status}): it finished no epoch")
        if self.loaded is None:
            data = load_data(self.spec)
            self.loaded = data, pretrained_weights(self.spec, data, self.folder)
        with checkpoint.as_directory() as directory:
            export_trial(trial.config, *self.loaded, directory, out)


def export(folder: SearchFolder, trial_id: str, out: str | Path) -> None:
    """One trial (`sharetune export`); the errors are SearchExport's."""
    SearchExport(folder)(trial_id, out)
