"""One-line errors and the exit codes that go with them: sharetune answers with one line, never a
traceback. The exit codes live here and nowhere else (the README's table lists them); this module imports
nothing heavy, so the dashboard commands read them without loading torch."""

from __future__ import annotations

import re
from enum import IntEnum
from typing import TypeVar

# scheme://user:password@host: a user may hold @ (Azure's user@server), a password @ too (up to the last one)
USER_PASSWORD = re.compile(r"([\w+.-]+://[^:/\s]*:)[^/\s]*@")


def without_passwords(text: str) -> str:
    """`text` (a URL, or a line quoting one) as a line may show it: each URL's password
    (`scheme://user:password@host`, read as SQLAlchemy and urllib read it) becomes `***`. Lines reach
    terminals, CI logs and Ray job logs that others read."""
    return USER_PASSWORD.sub(r"\1***@", text)


def first_line(err: BaseException) -> str:
    """The first line of the exception's message ("" when it has none), without passwords: what a
    one-line error quotes (MLflow's own errors quote the tracking URI)."""
    lines = str(err).strip().splitlines()
    return without_passwords(lines[0]) if lines else ""


E = TypeVar("E", bound=BaseException)


def cause_of(err: BaseException | None, kind: type[E]) -> E | None:
    """The `kind` error behind `err`: itself, what caused it, or a Ray Train rank's failure. Of a Ray task's
    copy of it (RayTaskError, whose message adds the remote traceback), the error it copies."""
    if err is None:
        return None
    if isinstance(err, kind):
        copied = getattr(err, "cause", None)
        return copied if isinstance(copied, kind) else err
    ranks = getattr(err, "worker_failures", {})  # Ray Train's WorkerGroupError: rank -> its exception
    return next(filter(None, (cause_of(failure, kind) for failure in ranks.values())), None) or cause_of(err.__cause__, kind)


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
