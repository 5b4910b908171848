"""How a search ended, as the command's exit code and one line: 0 only when every trial finished.

The exit codes themselves live in sharetune.errors (the README's table lists them).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sharetune.errors import ExitCode
from sharetune.metrics import STEP
from sharetune.search.storage import DUPLICATE_KIND, FAILED, FINISHED, INFEASIBLE_KIND, SearchFolder
from sharetune.spaces import trial_settings
from sharetune.trainables import ConfigurationError

CUT = "CUT"  # the report's status of a trial the search's time_limit_s ended before its last epoch
ENDED = (FINISHED, FAILED, CUT)
INFEASIBLE, DUPLICATE = INFEASIBLE_KIND.upper(), DUPLICATE_KIND.upper()  # the report's statuses of the skipped proposals


ERROR_LINE_CHARS = 200  # past this, an error line keeps its first sentence (Ray's paragraphs, e.g. a dead worker's)


def error_line(text: str | None) -> str:
    """A trial's error in one line: the exception's own line ("ValueError: ...") out of Tune's error
    text, which holds the whole traceback behind a "Failure # n" header per attempt. A long line is
    cut to its first sentence; the whole text stays in the trial's error.txt."""
    lines = [line for line in (text or "").splitlines() if line.strip() and not line.startswith("Failure # ")]
    unindented = [line for line in lines if not line[0].isspace() and not line.startswith("Traceback")]
    line = (unindented or lines or ["the trial raised"])[-1].strip()
    line = line.removeprefix(f"{ConfigurationError.__module__}.{ConfigurationError.__name__}: ")  # its message says it all
    if len(line) <= ERROR_LINE_CHARS:
        return line
    end = line.find(". ")
    return line[:end + 1] if 0 < end < ERROR_LINE_CHARS else line[:ERROR_LINE_CHARS] + "…"


def trial_error(trial) -> str:
    """A Tune trial's last error, one line (the driver's copy of its error.txt, else the stored one)."""
    local = Path(trial.error_file) if trial.error_file else None
    return error_line(local.read_text() if local is not None and local.is_file() else trial.get_error())


def cut_short(trial) -> bool:
    """Whether Tune ended `trial` (completed or TERMINATED) before its last epoch without deciding to:
    the time limit stops every running trial so. A scheduler's stop marks the last result done; a
    diverged trial stopped itself; one whose configuration no longer parses (an older version's
    folder) counts as whole."""
    last = trial.last_result or {}
    if last.get("done") or last.get("diverged"):
        return False
    try:
        return last.get(STEP, 0) < trial_settings(trial.config).epochs
    except ValueError:
        return False


def failed_trials(folder: SearchFolder, trials: list | None = None) -> dict[str, str]:
    """Trial id -> error line of each trial that ended in error, read from the folder (no running Ray
    needed); `trials`: Tune's trials of the folder, if already read. Tune's saved state can miss the
    last error (its final snapshot may not reach the folder), so a trial whose error.txt in the folder
    counts more failures than its retries allow, or an unbuildable configuration (never retried), is
    failed too."""
    max_failures = folder.spec().budget.max_failures
    failed = {}
    for trial in folder.tune_trials() if trials is None else trials:
        data = folder.read(f"{folder.trial_dirname(trial.trial_id)}/error.txt") if trial.status != FINISHED else None
        text = data.decode(errors="replace") if data else ""
        if trial.status == FAILED or text.count("Failure # ") > max_failures or ConfigurationError.__name__ in text:
            failed[trial.trial_id] = error_line(text)
    return failed


def outcome(trials: pd.DataFrame, mlflow_backlog: int = 0) -> tuple[ExitCode, str | None]:
    """The exit code and the line that explains it. `trials`: the report's table (Tune's trials, a
    failed one with its error line as `failed_trials` finds them, and the proposals answered without
    training); `mlflow_backlog`: writes still queued for MLflow."""
    tune_trials = trials[trials["trial_id"].notna()]
    if tune_trials.empty and INFEASIBLE in set(trials["status"]):  # every proposal answered without training
        return ExitCode.BAD_INPUT, (f"constraints: none of the {len(trials)} proposals met them, so no trial trained; "
                                    "loosen them")
    unfinished = tune_trials[~tune_trials["status"].isin(ENDED)]
    if not unfinished.empty:
        return ExitCode.INTERRUPTED, (f"interrupted: {len(unfinished)} of the {len(tune_trials)} trials started are unfinished; "
                                      "continue with `sharetune resume`")
    failed = tune_trials[tune_trials["status"] == FAILED]
    if not failed.empty:
        first = failed.iloc[0]
        return ExitCode.TRIALS_FAILED, f"{len(failed)} of {len(tune_trials)} trials failed: {first['trial_id']}: {first['error']}"
    if mlflow_backlog:
        return ExitCode.MLFLOW_BEHIND, (f"every trial finished, but {mlflow_backlog} writes wait for MLflow, which did not "
                                        "answer; `sharetune resume` delivers them")
    return ExitCode.OK, None
