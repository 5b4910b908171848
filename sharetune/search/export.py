"""`sharetune export`: one trial of a past search as a deployable model file, which
`sharetune.trainables.load_exported` reads without Ray or MLflow. Neither needs the search's data:
each checkpoint records what its model was built for."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from ray.train import Checkpoint

from sharetune.metrics import STEP
from sharetune.search.outcome import CUT, FINISHED, cut_short
from sharetune.search.storage import SearchFolder
from sharetune.spaces import describe_error, trial_settings
from sharetune.trainables import export_trial, run_checkpoint


class SearchExport:
    """A past search's trials as model files, its trials read once (a front of trials is exported together)."""

    def __init__(self, folder: SearchFolder) -> None:
        """FileNotFoundError where `folder` holds no search."""
        folder.check_search()
        self.folder = folder
        self.trials = {trial.trial_id: trial for trial in folder.tune_trials()}

    def __call__(self, trial_id: str, out: str | Path) -> None:
        """ValueError for a trial the search does not hold, or one without a checkpoint."""
        trial = self.trials.get(trial_id)
        if trial is None:
            raise ValueError(f"--trial: no trial {trial_id!r} in {self.folder}; its trials: "
                             f"{', '.join(sorted(self.trials)) or 'none yet'}")
        try:
            path = self.folder.last_checkpoint(trial_id)
            checkpoint = Checkpoint(path) if path else run_checkpoint(self.folder, trial_id)  # several workers: its Train run's
            if checkpoint is None:
                raise ValueError(f"it has no checkpoint (status {trial.status}): it finished no epoch")
            with checkpoint.as_directory() as directory:
                export_trial(trial.config, directory, out)
        except ValidationError as err:  # an edited state: pydantic's own message spans lines
            raise ValueError(f"--trial: {trial_id}: its settings in Tune's state are damaged ({describe_error(err)})") from None
        except ValueError as err:
            raise ValueError(f"--trial: {trial_id}: {err}") from None


    def unfinished(self, trial_id: str) -> str | None:
        """How far a trial that did not finish trained (an interrupted search's, a failed one's, one the
        time limit cut): its model is its last checkpoint's, which the file does not say; None for a
        finished trial (an early stop included: its search was done with it)."""
        trial = self.trials[trial_id]
        if trial.status == FINISHED and not cut_short(trial):
            return None
        done = (trial.last_result or {}).get(STEP, 0)
        try:
            planned = f" of {trial_settings(trial.config).epochs}"
        except ValueError:  # an older version's settings: the epochs done alone
            planned = ""
        status = CUT if trial.status == FINISHED else trial.status
        return f"trial {trial_id} is unfinished ({status}, {done}{planned} epochs): the model is its last checkpoint's"


def export(folder: SearchFolder, trial_id: str, out: str | Path) -> str | None:
    """One trial (`sharetune export`); the errors are SearchExport's. Returns a note where the trial is unfinished."""
    search = SearchExport(folder)
    search(trial_id, out)
    return search.unfinished(trial_id)
