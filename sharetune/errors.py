"""One-line errors and the exit codes that go with them: sharetune answers with one line, never a
traceback. The exit codes live here and nowhere else (the README's table lists them); this module imports
nothing heavy, so the dashboard commands read them without loading torch."""

from __future__ import annotations

from enum import IntEnum


def first_line(err: BaseException) -> str:
    """The first line of the exception's message ("" when it has none): what a one-line error quotes."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


class ExitCode(IntEnum):
    OK = 0  # every trial finished
    NOT_STARTED = 1  # a submitted search's driver could not start (its runtime environment failed, say), so it gave
    # none of these: what `sharetune logs --follow` exits with then, with Ray's reason
    BAD_INPUT = 2  # refused before any trial: spec, data, cluster resources or address, disk, unrestorable folder;
    # or constraints no proposal met, so no trial ran
    TRIALS_FAILED = 3  # the search ended, but some trials raised (after their retries)
    MLFLOW_BEHIND = 4  # every trial finished, but MLflow did not answer: `sharetune resume` delivers the rest
    STORAGE_FULL = 5  # the search folder's disk filled up mid-search: free space, then `sharetune resume`
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): trials left unfinished; `sharetune resume` continues
