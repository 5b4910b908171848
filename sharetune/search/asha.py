"""Ray Tune's ASHA on one objective, its rungs kept in the search folder (sharetune.search.rungs)."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler

from sharetune.search.rungs import KeptRungs, RungsFile
from sharetune.storage_filesystem import FileStore


class ASHARungs(RungsFile):
    brackets: list[list[dict[str, float]]]  # each bracket's rungs, in order: trial id -> its value there


class KeptASHA(KeptRungs, ASHAScheduler):
    """Ray's scheduler unchanged but for its rungs' records (each bracket's: rung -> trial -> value)
    and its count of stopped trials, which a resumed search reads back."""

    RUNGS_FILE = "sharetune-asha.json"
    Rungs = ASHARungs

    def __init__(self, *, store: FileStore | None = None, **options) -> None:
        super().__init__(**options)
        self.keep_rungs_in(store)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self.restore_rungs()
        decision = super().on_trial_result(tune_controller, trial, result)
        self.save_rungs()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.restore_rungs()
        super().on_trial_complete(tune_controller, trial, result)
        self.save_rungs()

    def _rung_state(self) -> dict:
        return {"brackets": [[recorded for _, recorded in bracket._rungs] for bracket in self._brackets],
                "stopped": self._num_stopped}

    def _load_rungs(self, state: ASHARungs) -> None:
        shape, saved = [len(bracket._rungs) for bracket in self._brackets], [len(rungs) for rungs in state.brackets]
        if saved != shape:  # rungs are kept by position: they must line up
            raise ValueError(f"brackets: {saved} rungs, where this search has {shape}")
        for bracket, rungs in zip(self._brackets, state.brackets):
            for (_, recorded), saved in zip(bracket._rungs, rungs):
                recorded.update(saved)
        self._num_stopped = state.stopped
