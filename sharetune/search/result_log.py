"""Each trial's result.json (Tune's record of its results, a JSON row per result), appended to by a
trial that starts again with no row twice and none cut short.

Tune keeps the log in its staging folder and copies it whole to the search folder every few
seconds; a trial that starts again (retried after its worker died, or in `resume`) gets the stored
copy back and appends to it. That copy can end in a row cut short (a driver killed, or a staging
disk full, mid-append), and it can hold rows past the checkpoint the trial goes on from: a driver
killed, a disk full or a worker dead between a result and Tune's record of its checkpoint. The
trial reports those results again. So before the trial appends, its log keeps the whole rows up to
the result its checkpoint came with (none for a trial with no checkpoint, which starts afresh; a
trial on several workers replays its record from its Ray Train run). A retry in the same driver
keeps this driver's own rows where the stored copy lags behind them. Given to Tune, this logger
stands in for its default JSON one; sharetune reads no other log of Tune's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.logger import JsonLoggerCallback
from ray.tune.result import EXPR_RESULT_FILE, TRAINING_ITERATION


class ResultLog(JsonLoggerCallback):
    def log_trial_start(self, trial) -> None:
        log = Path(trial.local_path, EXPR_RESULT_FILE)
        own = log.read_bytes() if log.exists() else b""  # this driver's rows: never behind the stored copy
        super().log_trial_start(trial)  # the stored copy fetched over it (a trial with a checkpoint), held open to append
        restored = trial.latest_checkpoint_result
        iteration = restored.metrics.get(TRAINING_ITERATION, 0) if restored else 0
        stored = log.read_bytes()
        rewrite(log, stored, max(rows_up_to(own, iteration), rows_up_to(stored, iteration), key=len))


def rows_up_to(data: bytes, iteration: int) -> list[bytes]:
    """The whole rows of a result log whose result is at most `iteration`."""
    rows = []
    for line in data.split(b"\n"):
        try:
            if json.loads(line)[TRAINING_ITERATION] <= iteration:
                rows.append(line)
        except (ValueError, KeyError, TypeError):  # cut short, or no row at all
            continue
    return rows


def rewrite(log: Path, current: bytes, rows: list[bytes]) -> None:
    """Make `log` (now `current`) these rows, in place: Tune's logger holds the file open and appends
    at its end, wherever that now is."""
    data = b"".join(row + b"\n" for row in rows)
    if current != data:
        with log.open("r+b") as file:
            file.write(data)
            file.truncate()
