"""Each trial's result.json (Tune's record of its results, a JSON row per result), appended to by a
trial that starts again with no row twice and none cut short.

Tune keeps the log in its staging folder and copies it whole to the search folder every few
seconds; a trial that starts again (retried after its worker died, or in `resume`) gets the stored
copy back and appends to it. That copy can end in a row cut short (a driver killed, or a staging
disk full, mid-append), and it can hold rows past the checkpoint the trial goes on from: a driver
killed, a disk full or a worker dead between a result and Tune's record of its checkpoint. The
trial reports those results again. So before the trial appends, its log keeps the whole rows up to
the result its checkpoint came with (none for a trial with no checkpoint, which starts afresh; a
trial on several workers replays its record from its Ray Train run). Given to Tune, this logger
stands in for its default JSON one; sharetune reads no other log of Tune's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.logger import JsonLoggerCallback

ITERATION = "training_iteration"  # Tune's count of a trial's results, in every row
RESULT_LOG = "result.json"


class ResultLog(JsonLoggerCallback):
    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)  # the stored log copied back, and held open to append
        restored = trial.latest_checkpoint_result
        keep_rows_up_to(Path(trial.local_path) / RESULT_LOG, restored.metrics[ITERATION] if restored else 0)


def keep_rows_up_to(log: Path, iteration: int) -> None:
    """Keep the whole rows of `log` whose result is at most `iteration`, in place: Tune's logger holds
    the file open and appends at its end, wherever that now is."""
    data = log.read_bytes() if log.exists() else b""
    kept = b""
    for line in filter(None, data.split(b"\n")):
        try:
            at = json.loads(line)[ITERATION]
        except (ValueError, KeyError, TypeError):
            break  # cut short: the last row
        if at <= iteration:
            kept += line + b"\n"
    if kept != data:
        with log.open("r+b") as file:
            file.write(kept)
            file.truncate()
