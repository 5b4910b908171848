"""The `sharetune` command. The CLI's libraries (torch, Ray) take seconds to load, and a Ctrl-C that
breaks into an import can leave a library half loaded: a Ctrl-C meanwhile is held until they have
loaded, then gets the one line and exit code a later one gets. The commands on a submitted search
(status, logs, stop) load only their own module, without torch."""

import signal
import sys

from sharetune.errors import ExitCode


def main() -> None:
    pressed: list[int] = []
    default = signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    try:
        from sharetune.job_commands import JOB_COMMANDS, run

        if sys.argv[1:2] and sys.argv[1] in JOB_COMMANDS:
            from sharetune.job_commands import app
        else:
            from sharetune.cli import app
    finally:
        signal.signal(signal.SIGINT, default)
    if pressed:
        print("error: interrupted before the command started", file=sys.stderr)
        raise SystemExit(ExitCode.INTERRUPTED)
    run(app)
