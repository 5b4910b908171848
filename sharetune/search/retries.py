"""Which failed trials are retried: a trial whose worker or node died (`budget.max_failures` times,
from its last checkpoint), not one whose configuration cannot be built.

Ray 2.60's FailureConfig retries every failure alike, and decides before any callback or scheduler
hook sees the error. A trial whose configuration cannot be built reports so once before it raises
(sharetune.trainables.CONFIGURATION_ERROR); on that report this callback takes the trial's retries away.
"""

from __future__ import annotations

from ray.tune import Callback

from sharetune.trainables import CONFIGURATION_ERROR


class NoRetryWhenUnbuildable(Callback):
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if CONFIGURATION_ERROR in result:
            trial.max_failures = 0
